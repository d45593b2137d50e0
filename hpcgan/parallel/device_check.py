"""The world check on the training device, run by `hpcgan doctor` and at every training start.

A broken NCCL (wrong interface, a missing plugin, two ranks on one GPU) shows up as an error or a
hang in the first collective on the GPU, which would otherwise be step 1 of a job that waited in
the queue. Here it is one allreduce and one broadcast of a tensor on `backend.device` (and, with
SyncBatchNorm on, one forward of a converted BatchNorm2d), under a watchdog: a hang ends the job
after `timeout_s` with a line that says what was being checked.

The SyncBatchNorm forward proves synchronisation only on 2 ranks or more: each rank feeds a batch whose
statistics differ from those of the union of all ranks' batches (`sync_bn_batch`), so a BatchNorm that
kept its own statistics fails it. On one rank a rank's own statistics are the synchronised ones: the
check then shows that the converted layer runs on the device, and says that it proved no more."""

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
        note = ""
        if sync_bn and device.type == "cuda":
            what = f"{backend.name} allreduce/broadcast and a SyncBatchNorm forward on {device}"
            sync_batchnorm_forward(backend, device, rank, world)
            if world == 1:
                note = " (one rank: SyncBatchNorm ran, its synchronisation is proven only on 2 ranks or more)"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        watchdog.cancel()
    return f"{what} across {world} rank(s): ok{note}"


def sync_bn_batch(rank: int, device="cpu") -> torch.Tensor:
    """Rank r's batch of the SyncBatchNorm check, (2, 2, 4, 4): half its values r - 1, half r + 1, a mean
    of r and a variance of 1 per channel. The union over 2 or more ranks has the variance
    1 + (world**2 - 1) / 12 (the spread of the ranks' means adds to their own), more than any rank's
    own: a BatchNorm that kept its own statistics fails the check on every rank."""
    signs = torch.tensor([-1.0, 1.0], device=device).repeat(16).view(2, 1, 4, 4).expand(2, 2, 4, 4)
    return float(rank) + signs


def synced_bn_stats(world: int) -> tuple:
    """(mean, unbiased variance) per channel of the union of the `world` ranks' batches: the running
    statistics that a synchronised BatchNorm of momentum 1 holds after one forward."""
    union = torch.cat([sync_bn_batch(r) for r in range(world)]).transpose(0, 1).reshape(2, -1)
    return union.mean(1), union.var(1, unbiased=True)


def check_sync_bn_stats(mean: torch.Tensor, var: torch.Tensor, rank: int, world: int, device):
    """HpcganError unless the running statistics (on the CPU) are those of every rank's batch together."""
    want_mean, want_var = synced_bn_stats(world)
    if not (torch.allclose(mean, want_mean, rtol=1e-4) and torch.allclose(var, want_var, rtol=1e-4)):
        raise HpcganError(
            f"device check: SyncBatchNorm on {device} gave a batch mean {mean[0].item():g} and variance "
            f"{var[0].item():g} on rank {rank}, expected {want_mean[0].item():g} and {want_var[0].item():g} "
            f"over {world} ranks (this rank's own batch: mean {rank}, variance about 1): the statistics were not "
            "synchronised"
        )


def sync_batchnorm_forward(backend, device, rank, world):
    """One training forward of a BatchNorm2d (momentum 1: its running statistics are the batch's)
    converted by the backend, on rank-dependent batches (`sync_bn_batch`), checked."""
    bn = backend.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(2, momentum=1.0))).to(device).train()
    bn(sync_bn_batch(rank, device))
    check_sync_bn_stats(bn[0].running_mean.cpu(), bn[0].running_var.cpu(), rank, world, device)


def _stalled(what, timeout_s, rank):
    command = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "hpcgan"
    sys.stderr.write(
        f"{command}: error: device check: {what} did not finish within {timeout_s:g} s on rank {rank}: "
        "a rank cannot reach the others over this transport (NCCL: check NCCL_SOCKET_IFNAME, "
        "NCCL_DEBUG=INFO; two ranks on one GPU?)\n"
    )
    sys.stderr.flush()
    os._exit(1)  # the main thread is stuck inside the collective; the launcher ends the other ranks
