"""Run under `srun --mpi=pmix`: time an 8-byte and a SIZE_MIB MiB float32 sum-allreduce (after a warm-up
that opens the connections) and check its result; rank 0 prints one JSON line with every rank's
host, the bytes reduced, the times and whether every rank got the right sum."""

import json
import socket
import sys
import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
size_mib = int(sys.argv[1])


def timed_allreduce(values):
    result = np.empty_like(values)
    comm.Barrier()
    start = time.perf_counter()
    comm.Allreduce(values, result, op=MPI.SUM)
    return result, time.perf_counter() - start


timed_allreduce(np.ones(1024, np.float32))  # warm-up: the transport connects here
_, small_seconds = timed_allreduce(np.ones(2, np.float32))
values = np.full(size_mib * 2**20 // 4, comm.rank + 1, dtype=np.float32)
result, seconds = timed_allreduce(values)
correct = bool(np.all(result == comm.size * (comm.size + 1) / 2))
hosts = comm.gather(socket.gethostname())
everyone_correct = comm.gather(correct)
if comm.rank == 0:
    print(
        json.dumps(
            {
                "hosts": hosts,
                "bytes": values.nbytes,
                "seconds": seconds,
                "small_seconds": small_seconds,
                "correct": all(everyone_correct),
            }
        ),
        flush=True,
    )
