"""Run under mpirun: hpcgan.dist.split.map_units over 10 units; each rank writes OUT/rank-R.json with
[unit, rank that computed it, result] for every unit, as that rank received them."""
import json
import os
import sys

from mpi4py import MPI

from hpcgan.dist.split import map_units

comm = MPI.COMM_WORLD
results = map_units(comm, 10, lambda unit: [unit, comm.Get_rank(), unit * unit])
with open(os.path.join(sys.argv[1], f"rank-{comm.Get_rank()}.json"), "w") as f:
    json.dump(results, f)
