#!/usr/bin/env bash
# The GPU check: on one machine with a CUDA GPU, within about 10 minutes, everything that a CPU machine
# cannot show. Run it on a GPU node of a new cluster before the first long job:
#
#   HPCGAN_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash benchmarks/gpu_check.sh
#
# 1. set-up (scripts/setup.sh: Horovod built with NCCL when torch has CUDA; seconds when already done);
# 2. `hpcgan doctor --device cuda` under mpirun: NCCL allreduce/broadcast and a SyncBatchNorm forward;
# 3. the CUDA tests (tests/parallel/test_gpu.py, the CUDA cases of tests/models/test_models.py): fp16 + gradient
#    scalers on both backends, bf16, SyncBatchNorm, the NCCL world check, a deterministic bit-exact resume;
# 4. img/s of the study model (256x256x3, batch 8) under `hpcgan train` against the bare loop, fp32 and bf16.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${HPCGAN_VENV:-$ROOT/.venv}/bin/python
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1

step() { printf '\n== %s\n' "$*"; }
step "set-up"
bash scripts/setup.sh
command -v nvidia-smi >/dev/null && nvidia-smi -L
"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (CPU build, or no GPU visible): "
             "install a CUDA build of torch (HPCGAN_TORCH) and run on a GPU node")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}")
PY
step "hpcgan doctor on the GPU (NCCL, SyncBatchNorm)"
for backend in horovod torch; do
  timeout 180 mpirun -np 1 "$PY" -m hpcgan doctor --backend "$backend" --device cuda
done
step "CUDA tests"
timeout 420 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/parallel/test_gpu.py tests/models/test_models.py
step "throughput of the study model on the GPU"
timeout 300 "$PY" benchmarks/train.py --cuda
