#!/usr/bin/env bash
# The GPU check: on one machine with CUDA GPUs, within about 15 minutes, the GPU paths that a CPU machine
# cannot run. Run it on a GPU node of a new cluster before the first long job:
#
#   HPCGAN_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash benchmarks/gpu_check.sh
#
# 1. set-up (scripts/setup.sh: Horovod built with NCCL when torch has CUDA; seconds when already done);
# 2. `hpcgan doctor --device cuda`: NCCL allreduce/broadcast and a SyncBatchNorm forward, on 1 rank and,
#    with 2 GPUs visible, on 2 ranks (mpirun -np 2, one GPU per local rank);
# 3. the CUDA tests (tests/parallel/test_gpu.py, the CUDA cases of tests/models/test_models.py): fp16 + gradient
#    scalers on both backends, bf16, SyncBatchNorm, a deterministic bit-exact resume, ADA under
#    train.deterministic (the ops refused are those torch refuses), the joint model (model.mask_classes) with
#    ADA through `sample` and `evaluate --task segmentation --device cuda`, the segmentation task on the GPU;
#    with 2 GPUs also training on 2 ranks with SyncBatchNorm and the fp16 allreduce;
# 4. img/s of the study model (256x256x3, batch 8) under `hpcgan train` against the bare loop, fp32 and bf16;
# 5. the same for StyleGAN2 at 256x256x3 (configs/stylegan2-256.yaml, batch 8), fp32, bf16 (where the GPU has it)
#    and fp16, against a bare loop of its whole recipe (lazy R1 and path-length steps included, timed in whole
#    periods of them; benchmarks/bare_stylegan2.py). The reference reports about 41-46 img/s for its 256x256
#    config on one V100 (stylegan2-ada-pytorch, paper256, fp16 in the top layers).
#
# What one GPU can prove: the CUDA kernels run (AMP, scalers, SyncBatchNorm's layer, deterministic mode, ADA,
# the joint model, the segmentation task), NCCL starts, a resume is bit-exact on this GPU. What it cannot:
# that SyncBatchNorm synchronises statistics (one rank's own statistics are the synchronised ones), that the
# fp16 allreduce divides before the sum (it divides by 1), or that NCCL reaches another GPU; those need 2 GPUs
# here (steps 2 and 3 run them when 2 are visible) and, across nodes, `hpcgan doctor` under the cluster's
# launcher (docs/clusters.md). The summary at the end says which ran.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${HPCGAN_VENV:-$ROOT/.venv}/bin/python
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
MPIRUN=(mpirun --oversubscribe --bind-to none)

step() { printf '\n== %s\n' "$*"; }
step "set-up"
bash scripts/setup.sh
command -v nvidia-smi >/dev/null && nvidia-smi -L
GPUS=$("$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (CPU build, or no GPU visible): "
             "install a CUDA build of torch (HPCGAN_TORCH) and run on a GPU node")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}", file=sys.stderr)
print(torch.cuda.device_count())
PY
)
RANKS=1
[ "$GPUS" -ge 2 ] && RANKS="1 2"
step "hpcgan doctor on the GPU (NCCL, SyncBatchNorm) on $RANKS rank(s)"
for np in $RANKS; do
  for backend in horovod torch; do
    timeout 180 "${MPIRUN[@]}" -np "$np" "$PY" -m hpcgan doctor --backend "$backend" --device cuda
  done
done
step "CUDA tests (the joint model, ADA, the segmentation task; 2-rank tests with 2 GPUs)"
timeout 900 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/parallel/test_gpu.py tests/models/test_models.py
step "throughput of the study model on the GPU"
timeout 300 "$PY" benchmarks/train.py --cuda --models cepa2023
step "throughput of StyleGAN2 at 256x256x3 on the GPU (reference: about 41-46 img/s on one V100)"
timeout 420 "$PY" benchmarks/train.py --cuda --models stylegan2-256
step "summary"
if [ "$GPUS" -ge 2 ]; then
  echo "gpu_check: $GPUS GPUs: ran the 1-GPU checks and the 2-rank checks (SyncBatchNorm synchronisation, fp16 allreduce division, NCCL between GPUs)"
else
  echo "gpu_check: 1 GPU: the CUDA kernels, AMP, deterministic mode, ADA, the joint model and the segmentation task ran;"
  echo "gpu_check: NOT shown: SyncBatchNorm synchronisation, the fp16 allreduce's division, NCCL between GPUs (need 2 GPUs)"
fi
