#!/usr/bin/env bash
# `make demo`: the whole job end to end on real brain MRI that ships in installed packages.
# Outputs go to ./demo (remove it with `make clean-demo`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
HPCGAN=${HPCGAN:-$ROOT/.venv/bin/hpcgan}
DEMO=${HPCGAN_DEMO_DIR:-$ROOT/demo}
NP=${HPCGAN_DEMO_RANKS:-2}
MPIRUN=(mpirun -np "$NP" --bind-to none --oversubscribe)
if [ "$(id -u)" = 0 ]; then  # Open MPI refuses root unless told; containers lack CMA
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMP_NUM_THREADS=1
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. real MRI sample data -> $DEMO/mri"
"$HPCGAN" sample-data "$DEMO/mri"

step "2. environment check on $NP ranks"
"${MPIRUN[@]}" "$HPCGAN" doctor

printf '\ndemo finished: outputs in %s\n' "$DEMO"
