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

step "3. preprocess: T1 axial slices 60-107, 64x64, one subject for training, one for validation"
"${MPIRUN[@]}" "$HPCGAN" preprocess --input "$DEMO/mri" --output "$DEMO/dataset" --modalities t1 \
    --slices 60:108 --size 64 --val-fraction 0.5 --shards 2

step "4. train WGAN-GP 64x64 on $NP ranks with Horovod (a second 'make demo' resumes and stops at once)"
"${MPIRUN[@]}" "$HPCGAN" train --config wgan-gp-64 --data "$DEMO/dataset" --out "$DEMO/run" \
    --set train.steps=300 --set train.batch_size=8 --set checkpoint.every_steps=100 \
    --set log.every_steps=20 --set log.sample_every_steps=50 --resume auto

step "5. sample: two stacks of 100 slices each, as HDF5, NIfTI and PNG from the last checkpoint"
"${MPIRUN[@]}" "$HPCGAN" sample --checkpoint "$DEMO/run" --out "$DEMO/samples" --num-stacks 2 --seed 1

step "6. evaluate the stacks against the dataset (each metric beside its real-vs-real baseline)"
"${MPIRUN[@]}" "$HPCGAN" evaluate --data "$DEMO/dataset" --samples "$DEMO/samples" \
    --metrics swd,msssim,intensity,memorization --out "$DEMO/samples/evaluation.json" \
    --worst-dir "$DEMO/samples/worst"

step "7. report"
"$HPCGAN" report "$DEMO/run" --samples "$DEMO/samples" --evaluation "$DEMO/samples/evaluation.json"

printf '\ndemo finished: dataset, run, samples and %s/run/report.html in %s\n' "$DEMO" "$DEMO"
