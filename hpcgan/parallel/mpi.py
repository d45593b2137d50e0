"""MPI itself: the settings it needs before it starts, and the communicator of the whole job."""

import os


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
        from mpi4py import MPI  # optional, and importing it starts MPI: only when a command needs it
    except ImportError:
        return None
    return MPI.COMM_WORLD
