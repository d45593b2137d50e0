"""Waiting for the other ranks without burning a core."""
import time


def idle_barrier(comm, poll_s: float = 0.005):
    """A barrier that sleeps while it waits. MPI libraries busy-poll inside blocking
    collectives, so a rank that arrives early takes a core away from the ranks still working:
    costly wherever ranks share cores (oversubscribed nodes, other jobs on the node). Call it
    before a collective that may wait long (one rank planning, uneven work); the collective
    itself then finds every rank there."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)
