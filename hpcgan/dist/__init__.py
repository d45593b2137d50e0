"""Everything distributed lives here: launch environment, backends, job-wide abort."""
import os
import sys

from hpcgan.dist.env import LaunchEnv, launch_env, slurm_ntasks

__all__ = ["LaunchEnv", "launch_env", "slurm_ntasks", "abort_job", "mpi_comm"]


def mpi_comm():
    """mpi4py's COMM_WORLD, initialising MPI if need be; None when mpi4py is missing."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def abort_job(code: int):
    """End every rank of the job now. Called after the error line is printed on this rank."""
    if launch_env().world_size <= 1:
        return
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.COMM_WORLD.Abort(code)
    # No MPI in this process (Gloo/torch rendezvous): mpirun and `srun --kill-on-bad-exit`
    # end the job when one rank exits non-zero; os._exit skips handlers that could block.
    os._exit(code)
