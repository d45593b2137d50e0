#!/usr/bin/env bash
# Submit the whole study as chained Slurm jobs: preprocess -> train -> sample -> evaluate, each
# starting only if the one before succeeded (--dependency=afterok); if one fails, the ones after
# it are cancelled (--kill-on-invalid-dep=yes). With --sweep GRID the training is a job array over
# the grid (slurm/sweep.sbatch: each element trains, samples and evaluates) and a summary follows.
# sample and evaluate use the run's selected checkpoint (checkpoints/best, honouring the memorisation
# guard; HPCGAN_CHECKPOINT=$HPCGAN_RUN/checkpoints/latest for the newest); evaluate gets a GPU like sample
# (the segmentation task trains U-Nets) and scores HPCGAN_EVAL_SPLIT (val, or test for the final figures).
#
#   slurm/pipeline.sh                                  # on the login node
#   HPCGAN_INPUT=data/brats HPCGAN_CONFIG=cepa2023 HPCGAN_GPUS_PER_NODE=4 slurm/pipeline.sh
#   slurm/pipeline.sh --sweep "optim.lr=1e-4,2e-4" --no-preprocess
#
# Prints one line per job: "submitted STEP: job ID". Variables (paths, options for each step,
# partition/account/GPUs): slurm/README.md.
set -euo pipefail
usage() { echo "usage: slurm/pipeline.sh [--no-preprocess] [--sweep GRID]" >&2; exit 2; }
preprocess=1 grid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-preprocess) preprocess=0 ;;
    --sweep) [ $# -ge 2 ] || usage; grid=$2; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) usage ;;
  esac
  shift
done

HPCGAN_ROOT=${HPCGAN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export HPCGAN_ROOT
# shellcheck source=slurm/common.sh
source "$HPCGAN_ROOT/slurm/common.sh"

# Absolute paths, exported so that every job sees the same ones whatever its working directory.
HPCGAN_INPUT=$(hpcgan_abs "${HPCGAN_INPUT:-data/raw}")
HPCGAN_DATA=$(hpcgan_abs "${HPCGAN_DATA:-data/dataset}")
HPCGAN_RUN=$(hpcgan_abs "${HPCGAN_RUN:-runs/train}")
HPCGAN_SAMPLES=$(hpcgan_abs "${HPCGAN_SAMPLES:-$HPCGAN_RUN/samples}")
HPCGAN_REPORT=$(hpcgan_abs "${HPCGAN_REPORT:-$HPCGAN_RUN/evaluation.json}")
HPCGAN_SWEEP_DIR=$(hpcgan_abs "${HPCGAN_SWEEP_DIR:-runs/sweep}")
export HPCGAN_INPUT HPCGAN_DATA HPCGAN_RUN HPCGAN_SAMPLES HPCGAN_REPORT HPCGAN_SWEEP_DIR
export HPCGAN_LOGS HPCGAN_VENV

# Site options for every job (partition, account, QOS...) and the GPU layout of the GPU jobs.
# shellcheck disable=SC2206  # option lists
common=(--parsable --kill-on-invalid-dep=yes --output="$HPCGAN_LOGS/%x-%j.out" ${HPCGAN_SBATCH_ARGS:-})
# The multi-rank steps (preprocess, train, sweep) span HPCGAN_NODES nodes (HPCGAN_NODELIST: which ones)
# with HPCGAN_TASKS_PER_NODE ranks on each (default: one per GPU, or the scripts' #SBATCH line).
hpcgan_count HPCGAN_NODES "${HPCGAN_NODES:=1}"
export HPCGAN_NODES  # each job checks that it got them (hpcgan_check_nodes)
[ -z "${HPCGAN_TASKS_PER_NODE:-}" ] || hpcgan_count HPCGAN_TASKS_PER_NODE "$HPCGAN_TASKS_PER_NODE"
nodes=(--nodes="$HPCGAN_NODES" ${HPCGAN_NODELIST:+--nodelist="$HPCGAN_NODELIST"})
gpu=("${nodes[@]}") one_gpu=()
# Cores per rank of the train, sweep and sample jobs: a GPU rank needs several (main thread, Horovod's
# background thread, NCCL's proxy thread, data workers), so 4 by default with GPUs; on CPU nodes the
# scripts' #SBATCH line (1) unless HPCGAN_CPUS_PER_TASK says otherwise.
[ -z "${HPCGAN_CPUS_PER_TASK:-}" ] || hpcgan_count HPCGAN_CPUS_PER_TASK "$HPCGAN_CPUS_PER_TASK"
if [ "${HPCGAN_GPUS_PER_NODE:-0}" -gt 0 ]; then
  gpu+=(--gpus-per-node="$HPCGAN_GPUS_PER_NODE" --ntasks-per-node="${HPCGAN_TASKS_PER_NODE:-$HPCGAN_GPUS_PER_NODE}")
  one_gpu=(--gpus-per-task=1)
  : "${HPCGAN_CPUS_PER_TASK:=4}"
elif [ -n "${HPCGAN_TASKS_PER_NODE:-}" ]; then
  gpu+=(--ntasks-per-node="$HPCGAN_TASKS_PER_NODE")
fi
gpu+=(${HPCGAN_CPUS_PER_TASK:+--cpus-per-task="$HPCGAN_CPUS_PER_TASK"})
one_gpu+=(${HPCGAN_CPUS_PER_TASK:+--cpus-per-task="$HPCGAN_CPUS_PER_TASK"})
nodes+=(${HPCGAN_TASKS_PER_NODE:+--ntasks-per-node="$HPCGAN_TASKS_PER_NODE"})

after=()
submit() {  # submit STEP [SBATCH_OPTIONS...] SCRIPT [ARGS...]: sets $job, chained after the previous job
  local step=$1; shift
  # A refused submission (more nodes than the partition has, an unknown node in HPCGAN_NODELIST,
  # a bad partition or account) is a configuration error: sbatch's reason on one line, exit 2.
  local errors
  errors=$(mktemp)
  if ! job=$(sbatch "${common[@]}" "${after[@]}" "$@" 2>"$errors"); then
    local reason
    reason=$(sed 's/^sbatch: error: //' "$errors" | tr '\n' ' ')
    reason=${reason% }
    rm -f "$errors"
    hpcgan_die "sbatch refused the $step job (HPCGAN_NODES=$HPCGAN_NODES${HPCGAN_NODELIST:+ HPCGAN_NODELIST=$HPCGAN_NODELIST}): $reason"
  fi
  rm -f "$errors"
  echo "submitted $step: job $job${after:+ (${after[*]})}"
  after=(--dependency="afterok:$job")
}

# shellcheck disable=SC2086  # HPCGAN_*_ARGS are option lists
if [ "$preprocess" = 1 ]; then
  submit preprocess "${nodes[@]}" "$HPCGAN_ROOT/slurm/preprocess.sbatch" ${HPCGAN_PREPROCESS_ARGS:-}
fi
if [ -n "$grid" ]; then
  hpcgan_command
  n=$("${HPCGAN_CMD[@]}" sweep --grid "$grid" --count)
  export HPCGAN_SWEEP_GRID=$grid
  submit sweep "${gpu[@]}" --array="0-$((n - 1))" "$HPCGAN_ROOT/slurm/sweep.sbatch" ${HPCGAN_TRAIN_ARGS:-}
  submit summary --ntasks-per-node=1 "$HPCGAN_ROOT/slurm/sweep.sbatch" --summary
  exit 0
fi
submit train "${gpu[@]}" "$HPCGAN_ROOT/slurm/train.sbatch" ${HPCGAN_TRAIN_ARGS:-}
submit sample "${one_gpu[@]}" "$HPCGAN_ROOT/slurm/sample.sbatch" ${HPCGAN_SAMPLE_ARGS:-}
submit evaluate "${one_gpu[@]}" "$HPCGAN_ROOT/slurm/evaluate.sbatch" ${HPCGAN_EVALUATE_ARGS:-}
