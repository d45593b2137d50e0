# shellcheck shell=bash
# Shared by every slurm/*.sbatch script (sourced, not run): how hpcgan is found and launched.
# Every site-specific value is an environment variable with a default that runs on a plain
# single-node Slurm; they are all explained in slurm/README.md.
#
#   HPCGAN_ROOT       the hpcgan checkout (default: found from the submitted script's path)
#   HPCGAN_VENV       virtual environment holding hpcgan (default: $HPCGAN_ROOT/.venv)
#   HPCGAN_MODULES    modules to `module load` first, e.g. "cuda/12.1 openmpi/4.1.5" (default: none)
#   HPCGAN_LAUNCHER   srun (default) or mpirun
#   HPCGAN_SRUN_MPI   srun --mpi plugin (default: pmix; Open MPI 4/5 want pmix)
#   HPCGAN_MPIRUN_ARGS extra mpirun options (default: --bind-to none)
#   HPCGAN_CONTAINER  an Apptainer/Singularity image: run hpcgan inside it (hybrid MPI model)
#   HPCGAN_CONTAINER_ARGS options for `apptainer exec` (default: --nv, i.e. the host's GPU driver)
#   HPCGAN_LOGS       directory for the per-rank logs (default: logs, relative to the submit dir)
#   HPCGAN_NODES      nodes a multi-rank job must have (default: 1; pipeline.sh asks sbatch for them)
#   HPCGAN_GROUP_READABLE 1: outputs and logs readable by the group (0750/0640); default private (0700/0600)
#
# Relative paths in any HPCGAN_* variable are relative to the directory you submit from.

hpcgan_die() { echo "hpcgan slurm: error: $*" >&2; exit 2; }

hpcgan_count() {  # hpcgan_count NAME VALUE: die unless VALUE is a whole number >= 1
  [[ $2 =~ ^[1-9][0-9]*$ ]] || hpcgan_die "$1=$2: expected a whole number >= 1"
}

hpcgan_check_nodes() {  # in a multi-node step's job: die unless it got the HPCGAN_NODES nodes asked for
  local want=${HPCGAN_NODES:-1} have=${SLURM_JOB_NUM_NODES:-1}
  hpcgan_count HPCGAN_NODES "$want"
  [ "$want" -le "$have" ] || hpcgan_die "HPCGAN_NODES=$want but job ${SLURM_JOB_ID:-?} has $have node(s)" \
    "(${SLURM_JOB_NODELIST:-?}): submit it with sbatch --nodes=$want (slurm/pipeline.sh does)"
}

hpcgan_abs() {  # hpcgan_abs PATH: absolute, without needing PATH to exist
  case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac
}

# --- environment: modules, then the hpcgan command (venv or container) ----------------------------
if [ -n "${HPCGAN_MODULES:-}" ]; then
  command -v module >/dev/null 2>&1 || hpcgan_die "HPCGAN_MODULES is set but there is no 'module' command"
  # shellcheck disable=SC2086  # a list of module names
  module load $HPCGAN_MODULES
fi
# Patient-derived outputs are private by default (hpcgan sets the same umask itself); this covers what
# the scripts and Slurm write: the log directory, the per-rank logs and the bound directories.
if [ "${HPCGAN_GROUP_READABLE:-0}" = 1 ]; then umask 027; else umask 077; fi
HPCGAN_VENV=$(hpcgan_abs "${HPCGAN_VENV:-$HPCGAN_ROOT/.venv}")
HPCGAN_LOGS=$(hpcgan_abs "${HPCGAN_LOGS:-logs}")
mkdir -p "$HPCGAN_LOGS"
export PYTHONUNBUFFERED=1
HPCGAN_EXIT_REQUEUE=75  # hpcgan.training.loop.EXIT_REQUEUE: checkpointed after a preemption signal
HPCGAN_BINDS=()  # directories the container must see (added by hpcgan_bind)

hpcgan_bind() {  # hpcgan_bind DIR...: create DIR and make it visible inside the container
  local dir
  for dir in "$@"; do
    mkdir -p "$dir"
    HPCGAN_BINDS+=("$dir")
  done
}

hpcgan_config() {  # sets CONFIG: $HPCGAN_CONFIG, a shipped name or a YAML file (made absolute, bound)
  CONFIG=${HPCGAN_CONFIG:-wgan-gp-64}
  if [ -f "$CONFIG" ]; then
    CONFIG=$(hpcgan_abs "$CONFIG")
    hpcgan_bind "$(dirname "$CONFIG")"
  fi
}

hpcgan_command() {  # sets HPCGAN_CMD: the hpcgan executable, or hpcgan inside the container
  if [ -n "${HPCGAN_CONTAINER:-}" ]; then
    [ -f "$HPCGAN_CONTAINER" ] || hpcgan_die "HPCGAN_CONTAINER=$HPCGAN_CONTAINER: no such image"
    local runtime
    runtime=$(command -v apptainer || command -v singularity) ||
      hpcgan_die "HPCGAN_CONTAINER is set but neither apptainer nor singularity is on PATH (HPCGAN_MODULES?)"
    local binds
    binds=$(IFS=,; echo "${HPCGAN_BINDS[*]}")
    # shellcheck disable=SC2206  # options are words
    HPCGAN_CMD=("$runtime" exec ${HPCGAN_CONTAINER_ARGS---nv} ${binds:+--bind "$binds"} "$HPCGAN_CONTAINER" hpcgan)
  else
    [ -x "$HPCGAN_VENV/bin/hpcgan" ] ||
      hpcgan_die "$HPCGAN_VENV/bin/hpcgan not found: run 'make setup' in $HPCGAN_ROOT, or set HPCGAN_VENV or HPCGAN_CONTAINER"
    HPCGAN_CMD=("$HPCGAN_VENV/bin/hpcgan")
  fi
}

hpcgan_launch() {  # hpcgan_launch ARGS...: hpcgan ARGS on every task of this job; returns its exit code
  # (HPCGAN_STEP_NTASKS=1 hpcgan_launch ... runs a one-process step inside a bigger job.)
  hpcgan_command
  local ntasks=${HPCGAN_STEP_NTASKS:-${SLURM_NTASKS:-1}}
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}  # torch threads = the cores Slurm gave each rank
  if [ -n "${SLURM_JOB_GPUS:-}${SLURM_GPUS_ON_NODE:-}${SLURM_GPUS_PER_TASK:-}${SLURM_GPUS_PER_NODE:-}" ] &&
     [ "${SLURM_GPUS_ON_NODE:-}" != 0 ] && [ "${SLURM_CPUS_PER_TASK:-1}" -lt 2 ]; then
    # One core would be shared by the rank's main thread, Horovod's and NCCL's threads and its data workers.
    echo "hpcgan slurm: warning: GPU job with ${SLURM_CPUS_PER_TASK:-1} CPU per task starves each rank:" \
      "submit with --cpus-per-task=4 (the commented #SBATCH lines; pipeline.sh: HPCGAN_CPUS_PER_TASK)" >&2
  fi
  local tag="${SLURM_JOB_NAME:-hpcgan}-${SLURM_JOB_ID:-local}"
  local launcher
  case "${HPCGAN_LAUNCHER:-srun}" in
    srun)
      # One rank per task; a rank that dies ends the step; per-rank logs (appended across requeues).
      launcher=(srun --mpi="${HPCGAN_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 --ntasks="$ntasks" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
                --open-mode=append --output="$HPCGAN_LOGS/$tag.step%s.rank%t.log")
      echo "per-rank logs: $HPCGAN_LOGS/$tag.step*.rank*.log" ;;
    mpirun)
      # mpirun takes its slots from the allocation; Open MPI writes DIR/1/rank.N/{stdout,stderr}.
      # One directory per command and run of the job (a requeued job runs again).
      local dir="$HPCGAN_LOGS/$tag.$1.run${SLURM_RESTART_COUNT:-0}" mpirun_args
      read -ra mpirun_args <<<"${HPCGAN_MPIRUN_ARGS:---bind-to none}"  # a list of options
      launcher=(mpirun -np "$ntasks" "${mpirun_args[@]}" --output-filename "$dir")
      echo "per-rank logs: $dir/1/rank.*/" ;;
    *) hpcgan_die "HPCGAN_LAUNCHER=${HPCGAN_LAUNCHER}: use srun or mpirun" ;;
  esac
  echo "+ ${launcher[*]} ${HPCGAN_CMD[*]} $*"
  # In the background so that this shell can take the preemption signal (#SBATCH --signal=B:USR1@...)
  # and forward it to the ranks; srun and mpirun both pass SIGUSR1 on to every task.
  "${launcher[@]}" "${HPCGAN_CMD[@]}" "$@" &
  local pid=$! rc=0
  trap 'HPCGAN_SIGNALLED=1; echo "hpcgan slurm: got SIGUSR1, forwarding it to the ranks (they checkpoint and exit 75)"
        kill -USR1 '"$pid"' 2>/dev/null || true' USR1
  while :; do
    rc=0
    wait "$pid" || rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # woken by the trap: keep waiting
    break
  done
  if [ "$rc" -gt 128 ]; then rc=0; wait "$pid" || rc=$?; fi  # it ended while the trap ran: its real status
  trap - USR1
  if [ "$rc" -ne 0 ] && [ "$rc" -ne "$HPCGAN_EXIT_REQUEUE" ]; then
    echo "hpcgan slurm: hpcgan $1 exited with code $rc; the end of each rank's log:" >&2
    tail -n 3 "$HPCGAN_LOGS/$tag".step*.rank*.log "$HPCGAN_LOGS/$tag.$1".run*/1/rank.*/std* >&2 2>/dev/null || true
    hpcgan_lost_nodes
  fi
  return "$rc"
}

hpcgan_lost_nodes() {  # after a failed step of a multi-node job: name the nodes whose slurmd no longer answers
  [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] || return 0
  local port item node i count rank=0 counts=() items=()
  port=$(scontrol show config 2>/dev/null | sed -n 's/^SlurmdPort *= *//p')
  # Ranks go to the nodes in blocks; SLURM_TASKS_PER_NODE="2(x3),1" means 2 on each of 3 nodes, then 1.
  IFS=, read -ra items <<<"${SLURM_TASKS_PER_NODE:-}"
  for item in "${items[@]}"; do
    if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      for ((i = 0; i < BASH_REMATCH[2]; i++)); do counts+=("${BASH_REMATCH[1]}"); done
    else
      counts+=("$item")
    fi
  done
  i=0
  while read -r node; do
    count=${counts[i]:-1}
    if ! timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2"' probe "$node" "${port:-6818}" 2>/dev/null; then
      echo "hpcgan slurm: error: node $node (rank$([ "$count" -gt 1 ] && echo "s $rank-$((rank + count - 1))" || echo " $rank"))" \
        "does not answer: it was lost; resubmit with the same HPCGAN_RUN: --resume auto continues from the last" \
        "checkpoint, on fewer nodes if need be" >&2
    fi
    rank=$((rank + count)) i=$((i + 1))
  done < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
}

hpcgan_finish() {  # hpcgan_finish RC: exit RC, but requeue this job when hpcgan stopped for a preemption
  local rc=$1
  # 75: every rank checkpointed and stopped. After a forwarded SIGUSR1 any failure counts too: the
  # first rank to exit 75 makes srun (--kill-on-bad-exit) terminate the others, so the step may
  # report 143, and the time limit is near anyway; --resume auto takes the newest valid checkpoint.
  if [ -n "${SLURM_JOB_ID:-}" ] && { [ "$rc" -eq "$HPCGAN_EXIT_REQUEUE" ] ||
       { [ "$rc" -ne 0 ] && [ "${HPCGAN_SIGNALLED:-0}" = 1 ]; }; }; then
    echo "hpcgan slurm: stopped for preemption (exit $rc); requeueing job $SLURM_JOB_ID (it resumes with --resume auto)"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    echo "hpcgan slurm: error: scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)" >&2
  fi
  exit "$rc"
}
