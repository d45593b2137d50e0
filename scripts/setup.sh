#!/usr/bin/env bash
# Set up hpcgan on a fresh Debian/Ubuntu machine or a cluster login node. Idempotent: a second
# run only checks. Called by `make setup` (and so by `make test` / `make demo`).
#
# What it does, in order:
#   1. MPI: uses the mpicc/mpirun on PATH; only if none is found and we are root, installs
#      Debian's openmpi-bin + libopenmpi-dev. Otherwise it stops and says how to load a module.
#   2. As root on Debian/Ubuntu, also: cmake and g++ (to build Horovod), shellcheck (lint),
#      mricron-data (Colin27 MRI), chromium + chromium-driver (the Turing-test page's browser test);
#      HPCGAN_DEV_TOOLS=0 (images) leaves out these test tools (shellcheck, chromium) and the `test` extra.
#   3. A virtual environment in .venv with torch (kept if already there, e.g. a CUDA build you
#      installed yourself; else $HPCGAN_TORCH, default torch==2.13.0), mpi4py built against the
#      MPI on PATH (its wheel cached in $HPCGAN_CACHE like Horovod's), and hpcgan with its dependencies.
#   4. Horovod 0.28.1 built from its PyPI sdist (sha256-pinned) with one patch: its CMake files ask
#      for C++14, torch >= 2.1 headers need C++17; both lines are set to 17 (upstream PR #3998,
#      never released). PyTorch only; MPI + Gloo controllers; NCCL when torch has CUDA (then nvcc
#      and NCCL are required: scripts/horovod-build.sh finds them). The wheel is cached in
#      $HPCGAN_CACHE (default ~/.cache/hpcgan), keyed by the Horovod, torch, CUDA (+ NCCL), MPI and
#      Python versions, so it is built once per machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# say, die, have and the decisions about the Horovod build (cache key, stamp, nvcc, NCCL, check).
# shellcheck source=scripts/horovod-build.sh
source "$ROOT/scripts/horovod-build.sh"
VENV=${HPCGAN_VENV:-$ROOT/.venv}
CACHE=${HPCGAN_CACHE:-$HOME/.cache/hpcgan}
TORCH_SPEC=${HPCGAN_TORCH:-torch==2.13.0}
HOROVOD_VERSION=0.28.1
HOROVOD_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
PY=${PYTHON:-python3}
# 1 (default): also what the tests need (shellcheck, chromium, pytest...); containers/install.sh sets 0.
DEV_TOOLS=${HPCGAN_DEV_TOOLS:-1}

is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {  # apt_install PKG... — only as root on a Debian-like system
  is_root && have apt-get || return 1
  say "installing Debian packages: $*"
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- 1-2. system pieces --------------------------------------------------------------------
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "Python >= 3.10 is needed ($PY is $("$PY" --version 2>&1))"
if ! have mpicc || ! have mpirun; then
  apt_install openmpi-bin libopenmpi-dev ||
    die "no MPI found (mpicc, mpirun). On a cluster: 'module load openmpi' (or your site's MPI module), then run this again"
fi
if ! have cmake || ! have g++; then
  apt_install cmake g++ || die "cmake and g++ are needed to build Horovod: 'module load cmake gcc' or install them"
fi
if [ ! -f /usr/share/mricron/templates/ch2.nii.gz ]; then
  apt_install mricron-data || say "mricron-data not installed (not root or no apt): sample data will have no Colin27"
fi
if [ "$DEV_TOOLS" = 1 ]; then
  if ! have shellcheck; then  # `make lint` and the test that every shell script is clean
    apt_install shellcheck || say "shellcheck not installed (not root or no apt): the shell-script lint test is skipped"
  fi
  if ! have chromium || ! have chromedriver; then  # tests/commands/test_turing_test.py reads the reader page in it
    apt_install chromium chromium-driver ||
      say "chromium not installed (not root or no apt): the browser test of the Turing-test page is skipped"
  fi
fi
MPI_VERSION=$(mpirun --version 2>&1 | head -1 | tr -cs 'A-Za-z0-9.' '-' | sed 's/-$//')

# --- 3. virtual environment ----------------------------------------------------------------
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
pip() { "$VPY" -m pip --disable-pip-version-check -q "$@"; }
STAMP="$VENV/.hpcgan-setup"
# The torch there now (none yet: "none none"): part of the stamp, so a torch switched between its CPU
# and CUDA builds gets its own Horovod.
read -r TORCH_VERSION CUDA_VERSION _ < <(torch_build "$VPY" 2>/dev/null || echo none none)
want_stamp=$(setup_stamp "$ROOT" "$MPI_VERSION" "$TORCH_VERSION" "$CUDA_VERSION")
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] &&
  "$VPY" -c 'import hpcgan, horovod.torch, mpi4py.MPI' 2>/dev/null; then
  check=$("$VENV/bin/horovodrun" --check-build) || check=""  # a failing check: install again below
  if (check_horovod_build "$check" "$CUDA_VERSION"); then
    say "up to date ($VENV)"
    echo "$check"
    exit 0
  fi
fi
if ! "$VPY" -c 'import torch' 2>/dev/null; then
  say "installing $TORCH_SPEC"
  pip install "$TORCH_SPEC"
fi
read -r TORCH_VERSION CUDA_VERSION PY_TAG < <(torch_build "$VPY")
pip install wheel "setuptools>=64" packaging
if ! "$VPY" -c 'import mpi4py' 2>/dev/null; then
  # Compiled against the MPI on PATH (minutes: one large C file), cached like Horovod's wheel, so that a new
  # venv or an image build on this machine installs it in seconds.
  MPI4PY_DIR="$CACHE/wheels/mpi4py-$MPI_VERSION-$PY_TAG"
  if ! cached_wheel_ok "$VPY" "$MPI4PY_DIR" mpi4py mpi4py/MPI.; then
    say "building mpi4py against $(command -v mpicc); a few minutes, once per machine"
    MPI4PY_BUILD=$(mktemp -d)
    pip wheel --no-deps --no-binary mpi4py -w "$MPI4PY_BUILD" mpi4py
    cache_wheel "$CACHE" "$MPI4PY_DIR" "$MPI4PY_BUILD"
    rm -rf "$MPI4PY_BUILD"
  fi
  pip install --no-deps "$MPI4PY_DIR"/mpi4py-*.whl
fi
say "installing hpcgan and its dependencies"
extras=sample-data
[ "$DEV_TOOLS" = 0 ] || extras=test,$extras
pip install -e "${ROOT}[$extras]"

# --- 4. Horovod ----------------------------------------------------------------------------
NCCL_VERSION=""
if [ "$CUDA_VERSION" != cpu ]; then
  find_nccl "$VPY" "$CUDA_VERSION"
  NCCL_VERSION=$(nccl_version "$NCCL_INCLUDE_DIR/nccl.h")
  say "NCCL ${NCCL_VERSION:-of unknown version}: $NCCL_LIB"
fi
KEY=$(horovod_cache_key "$HOROVOD_VERSION" "$TORCH_VERSION" "$CUDA_VERSION" "$MPI_VERSION" "$PY_TAG" "$NCCL_VERSION")
WHEEL_DIR="$CACHE/wheels/$KEY"
if ! cached_wheel_ok "$VPY" "$WHEEL_DIR" horovod horovod/torch/mpi_lib_v2; then
  say "building Horovod $HOROVOD_VERSION for torch $TORCH_VERSION ($CUDA_VERSION, $MPI_VERSION); a few minutes, once per machine"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  if [ "$CUDA_VERSION" != cpu ]; then
    find_nvcc "$CUDA_VERSION"
    horovod_nccl_env "$BUILD/nccl"
    say "nvcc: $HOROVOD_CUDA_HOME/bin/nvcc; NCCL for the build: $HOROVOD_NCCL_LIB (${HOROVOD_NCCL_LINK:-static})"
  fi
  pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$BUILD"
  echo "$HOROVOD_SHA256  $BUILD/horovod-$HOROVOD_VERSION.tar.gz" | sha256sum -c --quiet ||
    die "horovod-$HOROVOD_VERSION.tar.gz does not match its pinned sha256"
  tar -xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD"
  SRC="$BUILD/horovod-$HOROVOD_VERSION"
  for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "unexpected Horovod source: no C++14 line in $f"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
  done
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
  MAKEFLAGS="-j$(nproc)"
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS
  if [ "$CUDA_VERSION" != cpu ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  pip wheel --no-deps --no-build-isolation -w "$BUILD/wheel" "$SRC"
  cache_wheel "$CACHE" "$WHEEL_DIR" "$BUILD/wheel"
fi
say "installing Horovod from $WHEEL_DIR"
pip install --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl
pip install cffi cloudpickle psutil pyyaml packaging  # Horovod's own runtime dependencies
check=$("$VENV/bin/horovodrun" --check-build)
echo "$check"
check_horovod_build "$check" "$CUDA_VERSION" "$WHEEL_DIR"
setup_stamp "$ROOT" "$MPI_VERSION" "$TORCH_VERSION" "$CUDA_VERSION" > "$STAMP"
say "done"
