"""Run under mpirun with 2 ranks: MODE BACKEND OUT.

fp16     gradients of 40000 on every rank through the backend's fp16-compressed allreduce: the mean is
         40000, but a sum before the division (80000) overflows fp16 to inf. Writes OUT/rank-R.pt.
stall    rank 1 arrives 60 s late at the device check, whose watchdog (3 s) must end rank 0.
timeout  rank 1 arrives 60 s late at an allreduce of a backend made with a 5 s collective timeout."""

import os
import sys
import time

import torch

from hpcgan.parallel import make_backend
from hpcgan.parallel.device_check import check_device_collectives

mode, backend_name, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "fp16":
    backend = make_backend(backend_name, device="cpu", fp16_allreduce=True, collective_timeout_s=120)
    model = torch.nn.Linear(3, 1, bias=False)
    optimizer = backend.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, "m")
    optimizer.zero_grad()
    # d/dw of sum(w·x) is x: every rank's gradient is [40000, 3e-3 (r + 1), 1].
    model(torch.tensor([[40000.0, 3e-3 * (backend.rank + 1), 1.0]])).sum().backward()
    backend.step(optimizer)
    torch.save(
        {"grad": model.weight.grad.clone(), "stall_shutdown": os.environ.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS")},
        os.path.join(out, f"rank-{backend.rank}.pt"),
    )
elif mode == "stall":
    backend = make_backend(backend_name, device="cpu")
    if backend.rank == 1:
        time.sleep(60)
    check_device_collectives(backend, timeout_s=3)
elif mode == "timeout":
    backend = make_backend(backend_name, device="cpu", collective_timeout_s=5)
    if backend.rank == 1:
        time.sleep(60)
    start = time.monotonic()
    try:
        backend.allreduce_(torch.ones(1), "sum")
    except Exception as exc:
        print(f"rank {backend.rank}: {type(exc).__name__} after {time.monotonic() - start:.0f} s", flush=True)
        os._exit(3)
backend.shutdown()
