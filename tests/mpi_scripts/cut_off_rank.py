"""Run under mpirun with 2 ranks: MODE BACKEND WATCHDOG_S, CPU, a backend made with train.watchdog_s's value.

stopped  after one allreduce rank 1 stops itself (SIGSTOP, outside any collective: a frozen or cut-off peer)
         and rank 0 prints "rank 0 waits" and enters an allreduce: its watchdog must end it.
healthy  both ranks compute (sleep) for 1.5 x WATCHDOG_S between two collectives, which must not end them;
         then three rounds in which rank 1 waits 0.4 x WATCHDOG_S in an allreduce for a busy rank 0 (1.2 x
         WATCHDOG_S in all, the clock starts again at each wait); prints "rank R done, longest wait S s"."""

import os
import signal
import sys
import time

import torch

from hpcgan.parallel import make_backend

mode, backend_name, limit_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
backend = make_backend(backend_name, device="cpu", watchdog_s=limit_s)
backend.allreduce_(torch.ones(1), "sum")
if mode == "stopped":
    if backend.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        time.sleep(1)  # rank 1 is stopped by now
        print("rank 0 waits", flush=True)
        backend.allreduce_(torch.ones(1), "sum")
        print("rank 0: the allreduce returned", flush=True)
elif mode == "healthy":
    time.sleep(1.5 * limit_s)
    backend.barrier()
    for _ in range(3):
        if backend.rank == 0:
            time.sleep(0.4 * limit_s)
        backend.allreduce_(torch.ones(1), "sum")
    print(f"rank {backend.rank} done, longest wait {backend.watchdog.longest[0]:.1f} s", flush=True)
backend.shutdown()
