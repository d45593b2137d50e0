"""Where this process sits in the job, read from the launcher's environment.

Read before any MPI or Horovod initialisation so that logging and config validation can
run (and fail) on every rank before the first collective.
"""

import os
import re
from dataclasses import dataclass

from hpcgan.errors import UsageError

# (rank, size, local rank) variables, in the order launchers are tried.
_LAUNCHERS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI mpirun
    ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # srun --mpi=pmix + Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI hydra
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK"),  # horovodrun with Gloo
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun
)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def started_by_torchrun(environ=None) -> bool:
    """torchrun (torch.distributed.run) started this process; it may itself run under srun or mpirun,
    whose variables the children inherit but which count torchrun agents, not ranks."""
    env = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"))


def launch_env(environ=None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    launchers = _LAUNCHERS
    if started_by_torchrun(env):  # srun --mpi=pmi2 also sets PMI_RANK/PMI_SIZE, for the srun task
        launchers = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),)
    for rank_key, size_key, local_key in launchers:
        if rank_key in env and size_key in env:
            try:
                rank, size = int(env[rank_key]), int(env[size_key])
                local = int(env.get(local_key, rank))
            except ValueError:
                continue
            return LaunchEnv(rank, size, local)
    return LaunchEnv()


def slurm_ntasks(environ=None):
    """SLURM_NTASKS when srun itself started this process inside an allocation, else None."""
    env = os.environ if environ is None else environ
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return None  # a batch script itself, or mpirun inside an allocation: no srun step
    if started_by_torchrun(env):
        return None  # `srun torchrun --nproc-per-node=N`: srun started the agents, the world is WORLD_SIZE
    value = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    return int(value) if value and value.isdigit() else None


def _expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's "2(x3),1" (2 tasks on each of 3 nodes, then 1) as [2, 2, 2, 1]."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            return []
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def local_world_size(environ=None) -> tuple[int, str] | None:
    """(ranks on this node that share this process's view of the GPUs, the variable that says so),
    or None when the launcher does not tell."""
    env = os.environ if environ is None else environ
    keys = (
        ("LOCAL_WORLD_SIZE",)
        if started_by_torchrun(env)
        else ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "HOROVOD_LOCAL_SIZE")
    )
    for key in keys:
        if env.get(key, "").isdigit():
            return int(env[key]), key
    if started_by_torchrun(env) or slurm_ntasks(env) is None:
        return None
    counts = _expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))  # srun started the ranks
    node = env.get("SLURM_NODEID", "0")
    if node.isdigit() and int(node) < len(counts):
        return counts[int(node)], "SLURM_STEP_TASKS_PER_NODE"
    return None


# Slurm sets these when the job or step was given GPUs: the GPU ids ("0,1"; "0" is a GPU), then
# counts or the request as typed ("2", "a100:2"; "0" is none).
SLURM_GPU_ID_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
SLURM_GPU_COUNT_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS_PER_NODE", "SLURM_GPUS")


def slurm_gpus(environ=None) -> str | None:
    """'NAME=value' of the first Slurm variable saying GPUs were allocated, else None."""
    env = os.environ if environ is None else environ
    for key in SLURM_GPU_ID_VARIABLES + SLURM_GPU_COUNT_VARIABLES:
        value = env.get(key, "").strip()
        if not value or value == "N/A":
            continue
        if key in SLURM_GPU_ID_VARIABLES or not re.fullmatch(r"(\w+:)*0", value):
            return f"{key}={value}"
    return None


def _gpus_bound_per_task(env, ranks: int) -> bool:
    """srun gave each task of this node its own GPUs: --gpus-per-task (which implies
    --gpu-bind=per_task) or --gpu-bind, or the step holds at least a GPU per local task."""
    if slurm_ntasks(env) is None:
        return False  # not started by srun: nothing set CUDA_VISIBLE_DEVICES per rank
    bind = env.get("SLURM_GPU_BIND", "")
    if env.get("SLURM_GPUS_PER_TASK", "").strip() or (bind and "none" not in bind.split(",")):
        return True
    on_node = env.get("SLURM_GPUS_ON_NODE", "")
    return on_node.isdigit() and int(on_node) >= ranks


def use_cuda(preference: str, cuda_version: str | None, visible_gpus: int, environ=None) -> bool:
    """Whether this rank runs on a GPU (`--device auto|cpu|cuda`, torch.version.cuda, the GPUs torch
    sees). UsageError where GPUs are expected but missing, or too few for the ranks on this node.

    GPUs are expected with --device cuda, and with --device auto when torch is a CUDA build or Slurm
    allocated GPUs: training on the CPU there is a forgotten `--gpus…` or a broken driver, not a
    choice. --device cpu always runs (a login node with a CUDA torch).

    Ranks sharing a GPU: each rank takes cuda:<local rank mod visible GPUs>, so when the ranks of a
    node all see the same V GPUs and are more than V, two of them get the same device and NCCL
    fails ("Duplicate GPU"). A rank seeing fewer GPUs than there are local ranks is fine only when
    each rank was given its own: `srun --gpus-per-task=1` (or --gpu-bind) sets CUDA_VISIBLE_DEVICES
    (and SLURM_STEP_GPUS) per task, so every task sees one GPU, a different one, and takes cuda:0.
    A rank cannot see the others' GPUs, so the decision rests on srun's variables
    (_gpus_bound_per_task); otherwise nothing binds GPUs to ranks (mpirun, torchrun, or srun with
    --gpus-per-node: every rank inherits the same CUDA_VISIBLE_DEVICES) and it is refused, as is a
    wrapper script setting CUDA_VISIBLE_DEVICES per rank outside Slurm (it cannot be told apart)."""
    env = os.environ if environ is None else environ
    if preference == "cpu":
        return False
    visible_env = f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(unset)')}"
    allocated = slurm_gpus(env)
    if visible_gpus == 0:
        if preference == "cuda":
            raise UsageError(
                f"--device cuda: torch sees no CUDA device on this node ({visible_env}, torch "
                f"CUDA build: {cuda_version or 'none'})"
            )
        if cuda_version and allocated:
            raise UsageError(
                f"--device auto: Slurm allocated GPUs ({allocated}) but torch (CUDA {cuda_version}) "
                f"sees none ({visible_env}): check the node's driver (nvidia-smi) and, in a container, "
                "apptainer --nv; or pass --device cpu"
            )
        if cuda_version:
            raise UsageError(
                f"--device auto: torch is a CUDA {cuda_version} build but sees no GPU ({visible_env}): "
                "request GPUs (sbatch --gpus-per-task=1) or pass --device cpu to train on the CPU"
            )
        if allocated:
            raise UsageError(
                f"--device auto: Slurm allocated GPUs ({allocated}) but this torch is built without "
                "CUDA: install a CUDA build of torch, or pass --device cpu"
            )
        return False
    local = local_world_size(env)
    if local is not None and local[0] > visible_gpus:
        ranks, key = local
        if not _gpus_bound_per_task(env, ranks):
            raise UsageError(
                f"{ranks} ranks on this node ({key}={ranks}) but each sees {visible_gpus} GPU(s) "
                f'({visible_env}): ranks would share a GPU (NCCL "Duplicate GPU"); start at most '
                f"{visible_gpus} rank(s) per node, or give each its own (srun --gpus-per-task=1)"
            )
    return True


def slurm_threads(environ=None) -> int | None:
    """Threads for torch from Slurm's --cpus-per-task, unless OMP_NUM_THREADS already says (the user,
    slurm/common.sh or torchrun set it; torch reads it itself). Under `srun torchrun` the task's cores
    are shared by the LOCAL_WORLD_SIZE processes torchrun started."""
    env = os.environ if environ is None else environ
    cpus = env.get("SLURM_CPUS_PER_TASK", "")
    if env.get("OMP_NUM_THREADS") or not cpus.isdigit() or int(cpus) < 1:
        return None
    sharing = env.get("LOCAL_WORLD_SIZE", "") if started_by_torchrun(env) else ""
    return max(1, int(cpus) // max(1, int(sharing) if sharing.isdigit() else 1))
