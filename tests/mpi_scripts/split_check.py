"""Run under mpirun: hpcgan.parallel.split.map_units over 10 units on world_group(); each rank writes
OUT/rank-R.json with [unit, rank that computed it, result] for every unit, as that rank received them.
Also checks the group's barrier, gather_object and broadcast_object."""

import json
import os
import sys

from hpcgan.parallel.group import MpiGroup, world_group
from hpcgan.parallel.split import map_units

group = world_group()
assert isinstance(group, MpiGroup), group  # mpirun -np 3: the MPI group, not one process
results = map_units(group, 10, lambda unit: [unit, group.rank, unit * unit])
# The other collectives of the group, checked here (an assertion fails the mpirun).
group.barrier()
assert group.gather_object(group.rank) == list(range(group.world_size))
assert group.broadcast_object({"from": group.rank}, root=1) == {"from": 1}
with open(os.path.join(sys.argv[1], f"rank-{group.rank}.json"), "w") as f:
    json.dump(results, f)
