#!/usr/bin/env bash
# `make demo`: the whole job end to end on real brain MRI that ships in installed packages, long enough
# (1500 steps, about 3 minutes of training on 2 cores) to end near the real-vs-real baselines, with
# evaluation during training and the memorisation guard choosing the checkpoint that is sampled.
# `make demo QUICK=1` (HPCGAN_DEMO_QUICK=1): the same run stopped at step 300, about a minute in all; a later
# `make demo` continues it to 1500 (the recipe is the same, so the result is that of one straight run).
# Outputs go to ./demo (remove it with `make clean-demo`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
HPCGAN=${HPCGAN:-$ROOT/.venv/bin/hpcgan}
PY=${HPCGAN_PYTHON:-$ROOT/.venv/bin/python}
DEMO=${HPCGAN_DEMO_DIR:-$ROOT/demo}
NP=${HPCGAN_DEMO_RANKS:-2}
STEPS=1500
if [ "${HPCGAN_DEMO_QUICK:-0}" = 1 ]; then STEPS=300; fi
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

# The recipe of benchmarks/small_data.py's arm B: 48 training slices are few, so adaptive augmentation (ADA)
# keeps the critic from learning them by heart, and the guard keeps any checkpoint that copies training
# slices (memorisation above 0.04, twice its real-vs-real baseline of 1/48) from being selected.
step "4. train WGAN-GP 64x64 for $STEPS steps on $NP ranks with Horovod, evaluated every 100 steps (a second 'make demo' resumes)"
"${MPIRUN[@]}" "$HPCGAN" train --config wgan-gp-64 --data "$DEMO/dataset" --out "$DEMO/run" --resume auto \
    --set train.steps="$STEPS" --set train.ada_target=0.6 --set log.every_steps=50 \
    --set eval.every_steps=100 --set "eval.metrics=[swd,memorization]" --set checkpoint.every_steps=100 \
    --set checkpoint.max_memorization=0.04

step "5. sample: two stacks of 100 slices each, as HDF5, NIfTI and PNG, from the checkpoint the run selected"
"${MPIRUN[@]}" "$HPCGAN" sample --checkpoint "$DEMO/run" --out "$DEMO/samples" --num-stacks 2 --seed 1

step "6. evaluate the stacks against the dataset (each metric beside its real-vs-real baseline)"
"${MPIRUN[@]}" "$HPCGAN" evaluate --data "$DEMO/dataset" --samples "$DEMO/samples" \
    --metrics swd,msssim,intensity,memorization --out "$DEMO/samples/evaluation.json" \
    --worst-dir "$DEMO/samples/worst"

step "7. a blinded reading session: 40 slices, half real, half generated, to tell apart in a browser"
rm -rf "$DEMO/reading" "$DEMO/reading.key.json"  # made again from these samples
"$HPCGAN" turing-test make --data "$DEMO/dataset" --samples "$DEMO/samples" --out "$DEMO/reading" --num 40 --seed 1

step "8. report"
"$HPCGAN" report "$DEMO/run" --samples "$DEMO/samples" --evaluation "$DEMO/samples/evaluation.json"

step "what you have, and what the table means"
"$PY" -m hpcgan.demo_summary "$DEMO" "$STEPS"
