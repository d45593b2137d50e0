#!/bin/bash
# Stand-in for `apptainer` (not packaged for Debian 12): records its arguments, checks the image exists,
# then runs the command from the venv instead of inside the image.
echo "$*" >> "$(dirname "$0")/calls.log"
[ "$1" = exec ] || exit 99
shift
while [[ "$1" == --* ]]; do [ "$1" = --bind ] && shift; shift; done
[ -f "$1" ] || exit 98
shift
program=$1
shift
exec "$HPCGAN_TEST_VENV/bin/$program" "$@"
