"""Splitting independent units of work across the ranks of an MPI communicator.

Unit i runs on rank i % world_size and every rank gets all results back in unit order, so
a caller that combines them in order gets the same numbers on 1 or N ranks (each unit is
computed exactly as a single process would compute it)."""


def map_units(comm, num_units: int, fn) -> list:
    """[fn(i) for i in range(num_units)], the units spread over the ranks of `comm` (mpi4py
    communicator or None for one process); every rank returns the full list."""
    if comm is None or comm.Get_size() == 1:
        return [fn(i) for i in range(num_units)]
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = {i: fn(i) for i in range(rank, num_units, size)}
    results = {}
    for part in comm.allgather(mine):
        results.update(part)
    return [results[i] for i in range(num_units)]


def comm_rank(comm) -> int:
    return 0 if comm is None else comm.Get_rank()
