#!/usr/bin/env bash
# Builds the inside of the hpcgan image; run as root by containers/hpcgan.def (%post) and by
# containers/Dockerfile (RUN), with the hpcgan sources already in /opt/hpcgan. The Python part is
# scripts/setup.sh itself (venv, mpi4py against the image's MPI, hpcgan, Horovod 0.28.1 with the
# C++17 patch, NCCL when torch has CUDA): one way to install hpcgan, on a cluster or in an image.
#
#   MPI           source: Open MPI $OMPI_VERSION built from its release tarball (GPU image; match the
#                 host's major.minor for the hybrid model); debian: the distribution's Open MPI (CPU)
#   OMPI_VERSION  e.g. 4.1.6 (only for MPI=source)
#   TORCH_INDEX   pip index for torch, e.g. https://download.pytorch.org/whl/cu124 or .../whl/cpu;
#                 empty: pip's own configuration (a pip.conf bound into the build, see README.md)
#   TORCH_SPEC    torch requirement (default: torch)
#
# Build cache: when the build binds a directory at /var/cache/hpcgan/wheels (`podman build -v
# ~/.cache/hpcgan/wheels:/var/cache/hpcgan/wheels`), the Horovod and mpi4py wheels are taken from and kept
# there, keyed like scripts/setup.sh's cache, so an image build on a machine that has them compiles neither.
set -euo pipefail
: "${MPI:?MPI=source or debian}"
SRC=/opt/hpcgan
VENV=/opt/venv
BUILD_CACHE=/var/cache/hpcgan
if [ -d "$BUILD_CACHE/wheels" ] && [ -w "$BUILD_CACHE/wheels" ]; then
  cache=$BUILD_CACHE keep_cache=1
else
  cache=/tmp/hpcgan-cache keep_cache=0
fi
export DEBIAN_FRONTEND=noninteractive

apt-get update -qq
apt-get install -y -qq --no-install-recommends ca-certificates curl bzip2 make cmake g++ \
  python3 python3-dev python3-venv >/dev/null

if [ "$MPI" = debian ]; then
  apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null
else
  : "${OMPI_VERSION:?OMPI_VERSION, e.g. 4.1.6 (match the Open MPI on the host)}"
  build=$(mktemp -d)
  curl -fsSL "https://download.open-mpi.org/release/open-mpi/v${OMPI_VERSION%.*}/openmpi-$OMPI_VERSION.tar.bz2" |
    tar -xj -C "$build"
  cuda=(); [ -d /usr/local/cuda ] && cuda=(--with-cuda=/usr/local/cuda)
  # Slurm support so that srun --mpi=pmix and mpirun inside an allocation both work (internal PMIx).
  (cd "$build/openmpi-$OMPI_VERSION" && ./configure -q --prefix=/opt/openmpi --with-slurm "${cuda[@]}" &&
    make -s -j"$(nproc)" install) >/dev/null
  rm -rf "$build"
  export PATH=/opt/openmpi/bin:$PATH LD_LIBRARY_PATH=/opt/openmpi/lib:${LD_LIBRARY_PATH:-}
fi

# torch first (a CUDA or CPU build from TORCH_INDEX): scripts/setup.sh keeps a torch that is there.
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC:-torch}"
HPCGAN_VENV=$VENV HPCGAN_CACHE=$cache HPCGAN_DEV_TOOLS=0 bash "$SRC/scripts/setup.sh"

# Versions for the image's labels (read by hpcgan.def and printed in the Docker build log).
"$VENV/bin/python" - >/opt/hpcgan-versions <<'PY'
import horovod, mpi4py.MPI, torch, hpcgan
print(f"hpcgan {hpcgan.__version__}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
print(f"horovod {horovod.__version__}")
print(f"mpi {mpi4py.MPI.Get_library_version().splitlines()[0].strip()}")
PY
cat /opt/hpcgan-versions
[ "$keep_cache" = 1 ] || rm -rf "$cache"
rm -rf /root/.cache/pip
apt-get clean
rm -rf /var/lib/apt/lists/*
