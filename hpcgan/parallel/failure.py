"""How a job fails together: one rank's error line, then every rank ended (MPI abort), and the other
ranks' failing collectives recognised as consequences so that they stay quiet."""

import os
import sys

from hpcgan.errors import HpcganError
from hpcgan.parallel.env import launch_env

# How long a rank whose collective failed because another rank stopped waits for the launcher to end
# it (Open MPI does so within a second of the other rank's MPI_Abort) before it reports and aborts.
PEER_FAILURE_GRACE_S = 10.0


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
