# shellcheck shell=bash
# Sourced by scripts/setup.sh (and by tests/cluster/test_setup_script.py, which runs each function in real
# bash): the decisions about the Horovod build (and the cache of compiled wheels it shares with mpi4py), kept apart from the installing so that they can be
# tested on a machine without a GPU. Defines functions only; running nothing.

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# torch_build VPY -> "TORCH_VERSION CUDA_VERSION PY_TAG", e.g. "2.13.0 cpu py311" or "2.5.1 12.4 py311".
torch_build() {
  "$1" -c 'import sys, torch; print(torch.__version__.split("+")[0], torch.version.cuda or "cpu",
f"py{sys.version_info[0]}{sys.version_info[1]}")'
}

# horovod_cache_key HOROVOD_VERSION TORCH_VERSION CUDA_VERSION MPI_VERSION PY_TAG [NCCL_VERSION]
# The CPU key must not change: the wheels already in ~/.cache/hpcgan/wheels are found by it.
horovod_cache_key() {
  local nccl=${6:+-nccl$6}
  echo "horovod-$1-torch$2-$3$nccl-$4-$5"
}

# setup_stamp ROOT MPI_VERSION TORCH_VERSION CUDA_VERSION: what "up to date" means. Includes the torch
# build, so that a CUDA torch installed over the CPU one (or the reverse) gets its own Horovod.
setup_stamp() {
  local files_hash
  files_hash=$(cat "$1/setup.cfg" "$1/scripts/setup.sh" "$1/scripts/horovod-build.sh" | sha256sum | cut -c1-16)
  echo "$files_hash-$2-torch$3-$4"
}

# find_nvcc CUDA_VERSION [FALLBACK_CUDA_HOME...] (default /usr/local/cuda): exports HOROVOD_CUDA_HOME
# (Horovod's CMake takes $HOROVOD_CUDA_HOME/bin/nvcc as its CUDA compiler), or dies saying how to get nvcc.
find_nvcc() {
  local cuda=$1 nvcc="" home
  shift
  [ $# -gt 0 ] || set -- /usr/local/cuda
  for home in "${HOROVOD_CUDA_HOME:-}" "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then nvcc=$home/bin/nvcc; break; fi
  done
  if [ -z "$nvcc" ] && have nvcc; then nvcc=$(command -v nvcc); fi
  for home in "$@"; do
    if [ -z "$nvcc" ] && [ -x "$home/bin/nvcc" ]; then nvcc=$home/bin/nvcc; fi
  done
  [ -n "$nvcc" ] || die "torch has CUDA $cuda but no nvcc found: module load cuda/$cuda or set CUDA_HOME"
  # nvcc on PATH may be a link or a wrapper script (/usr/local/bin/nvcc): nvcc itself says where its toolkit is.
  HOROVOD_CUDA_HOME=$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  if [ -n "$HOROVOD_CUDA_HOME" ] && [ -x "$HOROVOD_CUDA_HOME/bin/nvcc" ]; then
    HOROVOD_CUDA_HOME=$(cd "$HOROVOD_CUDA_HOME" && pwd)
  else
    HOROVOD_CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  fi
  export HOROVOD_CUDA_HOME
  local release
  release=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')
  if [ "${release%%.*}" != "${cuda%%.*}" ]; then
    say "warning: $nvcc is CUDA ${release:-of unknown version}, torch was built with CUDA $cuda"
  fi
}

# nccl_version NCCL_H -> "2.21.5", from the header's NCCL_MAJOR/MINOR/PATCH.
nccl_version() {
  awk '$1 == "#define" && $2 == "NCCL_MAJOR" {M = $3} $1 == "#define" && $2 == "NCCL_MINOR" {m = $3}
       $1 == "#define" && $2 == "NCCL_PATCH" {p = $3} END {if (M != "") print M "." m "." p}' "$1"
}

# nccl_lib_in DIR: the first libnccl library in DIR (static, unversioned, then versioned), or fails.
nccl_lib_in() {
  local lib
  for lib in "$1/libnccl_static.a" "$1/libnccl.so" "$1"/libnccl.so.[0-9]*; do
    if [ -e "$lib" ]; then echo "$lib"; return 0; fi
  done
  return 1
}

# find_nccl VPY CUDA_VERSION: sets NCCL_INCLUDE_DIR (with nccl.h) and NCCL_LIB (a file), or dies naming
# the fixes. Looks at $HOROVOD_NCCL_HOME (the user's choice, alone), then the
# nvidia-nccl-cu* wheel in the venv (torch's CUDA wheels bring one), $NCCL_HOME/$NCCL_ROOT (modules),
# $HOROVOD_CUDA_HOME, and the system's libraries (ldconfig, /usr/lib/<arch>).
find_nccl() {
  local vpy=$1 cuda=$2 home include libdir lib pip_dir
  local -a candidates=()  # "INCLUDE_DIR LIB_DIR ..." pairs, as one string each
  if [ -n "${HOROVOD_NCCL_HOME:-}" ]; then
    home=$HOROVOD_NCCL_HOME
    candidates=("${HOROVOD_NCCL_INCLUDE:-$home/include} ${HOROVOD_NCCL_LIB:-$home/lib} $home/lib64")
  else
    # A namespace package in some wheels (no __file__): __path__ works for both kinds.
    pip_dir=$("$vpy" -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null) || pip_dir=""
    [ -z "$pip_dir" ] || candidates+=("$pip_dir/include $pip_dir/lib")
    for home in "${NCCL_HOME:-}" "${NCCL_ROOT:-}" "${HOROVOD_CUDA_HOME:-}"; do
      [ -z "$home" ] || candidates+=("$home/include $home/lib $home/lib64")
    done
    if have ldconfig; then
      lib=$(ldconfig -p 2>/dev/null | awk '$1 ~ /^libnccl\.so/ {print $NF; exit}')
      [ -z "$lib" ] || candidates+=("/usr/include $(dirname "$lib")")
    fi
    for libdir in /usr/lib/*-linux-gnu; do
      [ ! -d "$libdir" ] || candidates+=("/usr/include $libdir")
    done
  fi
  local candidate
  for candidate in "${candidates[@]}"; do
    read -r include candidate <<<"$candidate"
    [ -f "$include/nccl.h" ] || continue
    for libdir in $candidate; do
      if lib=$(nccl_lib_in "$libdir"); then
        NCCL_INCLUDE_DIR=$include NCCL_LIB=$lib
        return 0
      fi
    done
  done
  if [ -n "${HOROVOD_NCCL_HOME:-}" ]; then
    die "HOROVOD_NCCL_HOME=$HOROVOD_NCCL_HOME has no include/nccl.h with lib/libnccl.so*" \
      "(or set HOROVOD_NCCL_INCLUDE and HOROVOD_NCCL_LIB)"
  fi
  die "torch has CUDA $cuda but no NCCL was found: '$vpy -m pip install nvidia-nccl-cu${cuda%%.*}'," \
    "or 'module load nccl', or set HOROVOD_NCCL_HOME"
}

# horovod_nccl_env LINK_DIR: exports what Horovod 0.28.1's cmake/Modules/FindNCCL.cmake reads for the NCCL
# find_nccl found. It looks for libnccl_static.a, or with HOROVOD_NCCL_LINK=SHARED for "nccl", i.e.
# an unversioned libnccl.so; pip's wheel has only libnccl.so.2, so LINK_DIR gets lib/libnccl.so -> it
# and include -> its headers. The built library still asks for libnccl.so.2, which torch loads first.
horovod_nccl_env() {
  local link_dir=$1 libdir
  libdir=$(dirname "$NCCL_LIB")
  case $NCCL_LIB in
    */libnccl_static.a)
      export HOROVOD_NCCL_HOME=${libdir%/*} HOROVOD_NCCL_INCLUDE=$NCCL_INCLUDE_DIR HOROVOD_NCCL_LIB=$libdir ;;
    */libnccl.so)
      export HOROVOD_NCCL_HOME=${libdir%/*} HOROVOD_NCCL_INCLUDE=$NCCL_INCLUDE_DIR HOROVOD_NCCL_LIB=$libdir
      export HOROVOD_NCCL_LINK=SHARED ;;
    *)
      mkdir -p "$link_dir/lib"
      ln -sfn "$NCCL_INCLUDE_DIR" "$link_dir/include"
      ln -sfn "$NCCL_LIB" "$link_dir/lib/libnccl.so"
      export HOROVOD_NCCL_HOME=$link_dir HOROVOD_NCCL_INCLUDE=$link_dir/include HOROVOD_NCCL_LIB=$link_dir/lib
      export HOROVOD_NCCL_LINK=SHARED ;;
  esac
}

# check_horovod_build CHECK_BUILD_TEXT CUDA_VERSION [CACHED_WHEEL_DIR]: dies unless `horovodrun
# --check-build` shows PyTorch, MPI and, when torch has CUDA, NCCL. A wheel built without NCCL is
# removed from the cache so that the next run builds it again.
check_horovod_build() {
  local text=$1 cuda=$2 wheel_dir=${3:-}
  grep -q '\[X\] PyTorch' <<<"$text" ||
    die "Horovod's PyTorch extension is missing or does not load" \
      "(see the build log, or run python -c 'import horovod.torch')"
  grep -q '\[X\] MPI' <<<"$text" ||
    die "Horovod was built without its MPI controller (is mpicc the MPI that mpirun runs?)"
  if [ "$cuda" != cpu ] && ! grep -q '\[X\] NCCL' <<<"$text"; then
    [ -z "$wheel_dir" ] || rm -rf "$wheel_dir"
    die "torch has CUDA $cuda but Horovod was built without NCCL${wheel_dir:+ (its cached wheel is removed)}:" \
      "see the build log for 'NCCL'"
  fi
}

# cached_wheel_ok VPY WHEEL_DIR NAME EXTENSION: succeeds when WHEEL_DIR holds exactly one NAME-*.whl that reads
# to its end (every member's CRC) and has its compiled extension (a member EXTENSION*.so). A missing WHEEL_DIR
# fails quietly; a damaged one (an interrupted copy, a truncated file, a directory where the wheel should be)
# is removed with one line saying why, so that the caller builds it again.
cached_wheel_ok() {
  local vpy=$1 wheel_dir=$2 name=$3 extension=$4 problem
  [ -e "$wheel_dir" ] || return 1
  problem=$("$vpy" - "$wheel_dir" "$name" "$extension" 2>&1 <<'PY'
import glob, os, sys, zipfile
folder, name, extension = sys.argv[1:]
wheels = glob.glob(os.path.join(folder, f"{name}-*.whl"))
if len(wheels) != 1:
    sys.exit(f"{len(wheels)} {name}-*.whl files where one belongs")
wheel = os.path.basename(wheels[0])
if not os.path.isfile(wheels[0]) or os.path.islink(wheels[0]):
    sys.exit(f"{wheel} is not a regular file")
try:
    with zipfile.ZipFile(wheels[0]) as archive:
        bad = archive.testzip()
        members = archive.namelist()
except (zipfile.BadZipFile, OSError, EOFError) as exc:
    sys.exit(f"{wheel} is not a readable wheel ({exc})")
if bad is not None:
    sys.exit(f"{bad} in {wheel} fails its checksum")
if not any(m.startswith(extension) and m.endswith(".so") for m in members):
    sys.exit(f"{wheel} has no {extension}*.so")
PY
  ) && return 0
  say "the cached $name wheel in $wheel_dir is damaged ($problem): building it again"
  rm -rf "$wheel_dir"
  return 1
}

# cache_wheel CACHE WHEEL_DIR BUILT_DIR: moves the one wheel in BUILT_DIR into WHEEL_DIR under a temporary name,
# then renames it, so that an interrupted copy never looks like a wheel.
cache_wheel() {
  local partial
  mkdir -p "$1/wheels"
  partial=$(mktemp -d "$1/wheels/.partial-XXXXXX")
  cp "$3"/*.whl "$partial/"
  mv -T "$partial" "$2" || rm -rf "$partial"  # another set-up may have just put its own there
}
