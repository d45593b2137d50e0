"""torch.distributed: Gloo on CPU, NCCL on GPU (plus a Gloo group for CPU-side objects).

The rendezvous comes from the job itself, so the same `mpirun`/`srun` lines that start Horovod
start this backend: MASTER_ADDR/MASTER_PORT if set (torchrun), else rank 0 picks a free port and
tells the others through MPI."""

import contextlib
import gc
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from hpcgan.parallel.failure import CollectiveError
from hpcgan.parallel.backend import Backend, pick_device
from hpcgan.parallel.env import launch_env
from hpcgan.parallel.mpi import mpi_comm
from hpcgan.errors import HpcganError

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous_address(world_size: int) -> tuple[str, int]:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        return addr, int(port)
    comm = mpi_comm()
    if comm is None or comm.Get_size() != world_size:
        raise HpcganError(
            "torch backend: no MASTER_ADDR/MASTER_PORT and no MPI world of "
            f"{world_size} processes to agree on them (launch with mpirun, srun --mpi=pmix or torchrun)"
        )
    mine = (
        (os.environ.get("HPCGAN_MASTER_ADDR") or socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    )
    return comm.bcast(mine, root=0)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "auto", fp16_allreduce: bool = False, collective_timeout_s: float = 1800.0):
        env = launch_env()
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.fp16_allreduce = fp16_allreduce
        self.device = pick_device(self.local_rank, device)
        addr, port = rendezvous_address(self.world_size)
        kind = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            kind,
            init_method=f"tcp://{addr}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        # Objects and metrics live on the CPU; NCCL only takes CUDA tensors.
        self.cpu_group = dist.new_group(backend="gloo") if kind == "nccl" else None

    def _group(self, tensor):
        return None if tensor.is_cuda else self.cpu_group

    @contextlib.contextmanager
    def _collective(self, name, tensor):
        """Gloo and NCCL raise RuntimeError when another rank dies mid-collective (connection reset):
        CollectiveError marks it as a consequence, which the rank that failed first explains. The
        watchdog sees the wait: on the host for Gloo, until the GPU has run it for NCCL (asynchronous)."""
        try:
            with self.watchdog.waiting(name):
                yield
            if tensor.is_cuda:
                self.watchdog.queued(name)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CollectiveError(
                f"torch.distributed {name} failed, another rank has stopped or cannot be reached ({reason})"
            ) from exc

    def allreduce_(self, tensor, op="mean"):
        with self._collective("all_reduce", tensor):
            dist.all_reduce(tensor, op=_OPS[op], group=self._group(tensor))
        if op == "mean":
            tensor.div_(self.world_size)
        return tensor

    def broadcast_(self, tensor, root=0):
        with self._collective("broadcast", tensor):
            dist.broadcast(tensor, src=root, group=self._group(tensor))
        return tensor

    def allgather(self, tensor):
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with self._collective("all_gather", tensor):
            dist.all_gather(parts, tensor.contiguous(), group=self._group(tensor))
        return torch.stack(parts)

    def barrier(self):
        with self.watchdog.waiting("barrier"):
            self.allreduce_(torch.zeros(1), "sum")

    def shutdown(self):
        """Tear the process groups down while Python is fully alive. Gloo's worker threads drop their
        last references to the tensors of finished work a moment after the collective returns; if
        that happens during interpreter shutdown it needs the GIL and the process aborts (exit 134,
        pytorch/pytorch#190489, #179291). Collecting the groups here joins those threads first."""
        self.watchdog.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.cpu_group = None
        gc.collect()

    def synchronize(self, optimizer):
        """Average every gradient the optimizer holds in one flat allreduce. A missing gradient
        counts as zero, as in Horovod, so every rank sends a buffer of the same layout."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.fp16_allreduce and flat.dtype == torch.float32:
            # Divided before the fp16 cast and the sum: summing first overflows fp16 (max 65504) with
            # AMP-scaled gradients. Horovod does the same (gradient_predivide_factor = world size).
            flat = flat.div_(self.world_size).half()
            with self.watchdog.waiting("gradient allreduce"):
                self.allreduce_(flat, "sum")
        else:
            with self.watchdog.waiting("gradient allreduce"):
                self.allreduce_(flat, "mean")
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = g
            p.grad.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def convert_sync_batchnorm(self, module):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
