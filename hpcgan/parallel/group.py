"""Group, the one model of a job's ranks (see the package docstring), and its MPI implementation."""

import time

import numpy as np

from hpcgan.errors import HpcganError, UsageError
from hpcgan.parallel.env import launch_env
from hpcgan.parallel.failure import abort_job
from hpcgan.parallel.mpi import mpi_comm


class Group:
    """One process. Subclasses set `rank` and `world_size` and override the collectives; class
    attributes rather than __init__ so that a subclass with its own __init__ needs no super() call."""

    rank = 0
    world_size = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def gather_object(self, obj) -> list:
        """A list of every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def broadcast_object(self, obj=None, root: int = 0):
        """`obj` from `root` to every rank (the others pass anything, usually None)."""
        return obj

    def barrier(self):
        pass

    def on_root(self, work, *args):
        """Collective: rank 0 runs `work(*args)` and every rank returns its result, or every rank ends with
        rank 0's failure (`fail_together`): the one way a rank-0 read (a checkpoint, a plan) reaches the
        others, so that no rank waits in a collective for a rank that has failed."""
        outcome = None
        if self.is_root:
            try:
                outcome = (None, work(*args))
            except Exception as exc:  # every rank must learn of it; rank 0 re-raises the original
                failure = exc
                outcome = (getattr(exc, "exit_code", 1), None)
        self.barrier()  # the other ranks sleep while rank 0 works (a broadcast busy-polls)
        code, result = self.broadcast_object(outcome)
        if code is not None:
            if self.is_root:
                raise failure
            raise SystemExit(code)
        return result

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of every rank's `array` (same shape and numeric dtype on every rank),
        on every rank; here a copy. A subclass for several ranks that does not override it (the training
        backends) refuses rather than return its own part as the sum."""
        if self.world_size != 1:
            raise NotImplementedError(f"{type(self).__name__} has no allreduce_sum")
        return _numeric(array).copy()

    def abort(self, code: int):
        """End every rank of the job now, after this rank printed its error line (MPI abort); in a job
        of one process it returns and the caller exits."""
        abort_job(code)

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


def fail_together(rank: int, code: int, message: str):
    """End every rank with the same failure that all of them know of: rank 0 raises it (a UsageError for
    exit code 2, else HpcganError: its one error line), the others exit quietly with the same code."""
    if rank != 0:
        raise SystemExit(code)
    raise (UsageError if code == UsageError.exit_code else HpcganError)(message)


ONE_PROCESS = Group()  # the default of functions that take a group: it holds no state


def _numeric(array) -> np.ndarray:
    """`array` as numpy, refused unless it is integer or float: MPI maps only those to its types, and
    the one-process Group refuses the same, so code tried on one process also runs on many."""
    array = np.asarray(array)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"allreduce_sum: expected an integer or float array, got dtype {array.dtype}")
    return array


class MpiGroup(Group):
    """The ranks of an mpi4py communicator. Objects travel pickled by mpi4py: they come only from
    the other ranks of this job (our own processes), never from a file or a stranger, and they are
    mostly numpy arrays, which the torch.save / weights_only path of the training backends refuses
    (it would need converting to tensors and back on both sides)."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()

    def gather_object(self, obj) -> list:
        return self.comm.allgather(obj)

    def broadcast_object(self, obj=None, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """One MPI Allreduce of a contiguous numeric buffer: a new array, `array` is left as it is."""
        from mpi4py import MPI

        send = np.ascontiguousarray(_numeric(array))
        out = np.empty_like(send)
        self.comm.Allreduce(send, out, op=MPI.SUM)
        return out

    def barrier(self, poll_s: float = 0.005):
        """A barrier that sleeps while it waits. MPI libraries busy-poll inside blocking collectives,
        so a rank that arrives early takes a core away from the ranks still working: costly wherever
        ranks share cores (oversubscribed nodes, other jobs on the node). Call it before a collective
        that may wait long (one rank planning, uneven work); the collective then finds every rank there."""
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(poll_s)


def world_group() -> Group:
    """Every rank the launcher started: MpiGroup over COMM_WORLD when it started more than one
    process, else Group(). HpcganError where MPI does not see the world the launcher made (mpi4py
    missing, MPI singletons under an srun without PMIx, torchrun): every rank would otherwise do all
    the work and report only its own part."""
    expected = launch_env().world_size
    if expected <= 1:
        return ONE_PROCESS
    comm = mpi_comm()
    if comm is None:
        raise HpcganError(
            f"the launcher started {expected} processes but mpi4py is not installed: install it, or run one process"
        )
    if comm.Get_size() != expected:
        raise HpcganError(
            f"MPI sees a world of {comm.Get_size()} processes but the launcher started {expected}: start the "
            "ranks with mpirun, or under Slurm with `srun --mpi=pmix` and an MPI built with PMIx support"
        )
    return MpiGroup(comm)
