"""Splitting independent units of work across the ranks of a group (hpcgan.parallel.group).

Unit i runs on rank i % world_size and every rank gets all results back in unit order, so
a caller that combines them in order gets the same numbers on 1 or N ranks (each unit is
computed exactly as a single process would compute it)."""

from hpcgan.parallel.group import Group


def map_units(group: Group, num_units: int, fn) -> list:
    """[fn(i) for i in range(num_units)], the units spread over the ranks of `group`; every rank
    returns the full list."""
    if group.world_size == 1:
        return [fn(i) for i in range(num_units)]
    mine = {i: fn(i) for i in range(group.rank, num_units, group.world_size)}
    results = {}
    for part in group.gather_object(mine):
        results.update(part)
    return [results[i] for i in range(num_units)]
