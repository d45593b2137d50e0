"""The world check on the training device, run by `hpcgan doctor` and at every training start.

A broken NCCL (wrong interface, a missing plugin, two ranks on one GPU) shows up as an error or a
hang in the first collective on the GPU, which would otherwise be step 1 of a job that waited in
the queue. Here it is one allreduce and one broadcast of a tensor on `backend.device` (and, with
SyncBatchNorm on, one forward of a converted BatchNorm2d), under a watchdog: a hang ends the job
after `timeout_s` with a line that says what was being checked."""

import os
import sys
import threading

import torch

from hpcgan.errors import HpcganError

DEVICE_CHECK_TIMEOUT_S = 120.0


def check_device_collectives(backend, sync_bn: bool = False, timeout_s: float = DEVICE_CHECK_TIMEOUT_S) -> str:
    """Collective. Returns a one-line description of what was checked; raises HpcganError when a result
    is wrong; ends this process with exit 1 when the check does not finish within `timeout_s`."""
    device, rank, world = backend.device, backend.rank, backend.world_size
    what = f"{backend.name} allreduce/broadcast on {device}"
    watchdog = threading.Timer(timeout_s, _stalled, args=(what, timeout_s, rank))
    watchdog.daemon = True
    watchdog.start()
    try:
        total = backend.allreduce_(torch.full((4,), float(rank + 1), device=device), "sum")
        expected = world * (world + 1) / 2
        if not torch.all(total == expected):
            raise HpcganError(f"device check: {what} gave {total.tolist()} on rank {rank}, expected {expected:g}")
        sent = torch.arange(4, dtype=torch.float32, device=device) + 10 * rank
        got = backend.broadcast_(sent, root=0)
        if not torch.equal(got.cpu(), torch.arange(4, dtype=torch.float32)):
            raise HpcganError(f"device check: {what}: rank {rank} received {got.tolist()} from rank 0")
        if sync_bn and device.type == "cuda":
            what = f"{backend.name} allreduce/broadcast and a SyncBatchNorm forward on {device}"
            _sync_batchnorm_forward(backend, device, rank, world)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        watchdog.cancel()
    return f"{what} across {world} rank(s): ok"


def _sync_batchnorm_forward(backend, device, rank, world):
    """Rank r feeds a batch of value r: the synchronised batch mean is the mean over ranks, which a
    BatchNorm that did not synchronise (each rank's own mean, r) would not give."""
    bn = backend.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(2, momentum=1.0))).to(device).train()
    bn(torch.full((2, 2, 4, 4), float(rank), device=device))
    mean = bn[0].running_mean.cpu()
    expected = (world - 1) / 2
    if not torch.allclose(mean, torch.full_like(mean, expected)):
        raise HpcganError(
            f"device check: SyncBatchNorm on {device} gave a batch mean of {mean.tolist()} on rank "
            f"{rank}, expected {expected:g} (the statistics were not synchronised)"
        )


def _stalled(what, timeout_s, rank):
    command = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "hpcgan"
    sys.stderr.write(
        f"{command}: error: device check: {what} did not finish within {timeout_s:g} s on rank {rank}: "
        "a rank cannot reach the others over this transport (NCCL: check NCCL_SOCKET_IFNAME, "
        "NCCL_DEBUG=INFO; two ranks on one GPU?)\n"
    )
    sys.stderr.flush()
    os._exit(1)  # the main thread is stuck inside the collective; the launcher ends the other ranks
