"""Where this process sits in the job, read from the launcher's environment.

Read before any MPI or Horovod initialisation so that logging and config validation can
run (and fail) on every rank before the first collective.
"""
import os
from dataclasses import dataclass

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

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def launch_env(environ=None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_key in _LAUNCHERS:
        if rank_key in env and size_key in env:
            try:
                rank, size = int(env[rank_key]), int(env[size_key])
                local = int(env.get(local_key, rank))
            except ValueError:
                continue
            return LaunchEnv(rank, size, local)
    return LaunchEnv()


def slurm_ntasks(environ=None):
    """SLURM_NTASKS when this process was started by srun inside an allocation, else None."""
    env = os.environ if environ is None else environ
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return None  # a batch script itself, or mpirun inside an allocation: no srun step
    value = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    return int(value) if value and value.isdigit() else None
