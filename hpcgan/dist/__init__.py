"""Everything distributed lives here: launch environment, backends, job-wide abort."""
import os
import sys

from hpcgan.dist.env import LaunchEnv, launch_env, slurm_ntasks
from hpcgan.errors import HpcganError

__all__ = ["LaunchEnv", "launch_env", "slurm_ntasks", "abort_job", "mpi_comm", "make_backend", "BACKENDS",
           "CollectiveError", "lost_a_peer", "PEER_FAILURE_GRACE_S"]

# How long a rank whose collective failed because another rank stopped waits for the launcher to end
# it (Open MPI does so within a second of the other rank's MPI_Abort) before it reports and aborts.
PEER_FAILURE_GRACE_S = 10.0


def yield_when_idle():
    """Call before MPI starts. Open MPI busy-polls while it waits; Horovod's background thread waits
    in MPI all the time, so where ranks share cores (CPU training) it takes a core from the training
    thread: 2 ranks on 2 cores ran at 0.60 weak-scaling efficiency instead of 0.89
    (benchmarks/train.py). sched_yield costs nothing when the core is free. A user's value wins."""
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


def mpi_comm():
    """mpi4py's COMM_WORLD, initialising MPI if need be; None when mpi4py is missing."""
    yield_when_idle()
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


class CollectiveError(HpcganError):
    """A collective failed under this rank: another rank stopped (its error line says why) or cannot
    be reached."""


def lost_a_peer(exc: BaseException) -> bool:
    """True when `exc` is the consequence of another rank's failure, not a failure of this rank:
    Horovod shuts down on every rank when one rank fails; Gloo resets the connections of a rank
    that dies (the torch backend raises CollectiveError)."""
    horovod_errors = sys.modules.get("horovod.common.exceptions")
    if horovod_errors is not None and isinstance(exc, horovod_errors.HorovodInternalError):
        return True
    return isinstance(exc, CollectiveError)


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


BACKENDS = ("auto", "horovod", "torch", "none")


def make_backend(name: str = "auto", device: str = "auto", fp16_allreduce: bool = False):
    """Start the backend for this job and check that every rank sees the world the launcher made."""
    from hpcgan.errors import HpcganError, UsageError

    env = launch_env()
    if name == "auto":
        name = "horovod" if env.world_size > 1 else "none"
    if name == "none":
        if env.world_size > 1:
            raise UsageError(f"--backend none: the launcher started {env.world_size} processes; use horovod or torch")
        from hpcgan.dist.backend import Backend as cls
    elif name == "horovod":
        from hpcgan.dist.horovod_backend import HorovodBackend as cls
    elif name == "torch":
        from hpcgan.dist.torch_backend import TorchBackend as cls
    else:
        raise UsageError(f"--backend {name}: expected one of {', '.join(BACKENDS)}")
    yield_when_idle()
    backend = cls(device=device, fp16_allreduce=fp16_allreduce)
    expected = slurm_ntasks() or env.world_size
    if backend.world_size != expected:
        raise HpcganError(
            f"{name} backend sees a world of {backend.world_size} processes but the launcher started {expected}: "
            "MPI was not initialised through the launcher (under Slurm use `srun --mpi=pmix` with an MPI built "
            "with PMIx/Slurm support, or mpirun inside the allocation)")
    return backend
