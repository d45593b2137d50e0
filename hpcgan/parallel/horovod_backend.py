"""Horovod: MPI or Gloo controller on CPU, NCCL for GPU tensors when built with it.

The GAN pitfalls (../shared/NOTES.md) handled here: one DistributedOptimizer per network with
prefixed parameter names (no DUPLICATE_NAME_ERROR), fp16 compression as an option, and the AMP
order synchronize → unscale → skip_synchronize → step (in Backend.step)."""

import os

import torch

from hpcgan.parallel.backend import Backend, pick_device
from hpcgan.errors import HpcganError


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, device: str = "auto", fp16_allreduce: bool = False, collective_timeout_s: float = 1800.0):
        # Horovod has no collective timeout; its stall inspector shuts the job down when some ranks wait
        # longer than this for the others (a user's values win). Warnings start at half of it, so a long
        # rank-0 evaluation does not fill the logs with "stalled ranks".
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(collective_timeout_s)))
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(int(min(300, collective_timeout_s / 2))))
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(int(collective_timeout_s)))
        try:
            import horovod.torch as hvd
        except ImportError as exc:
            raise HpcganError(
                f"Horovod with PyTorch is not available ({exc}): run `make setup`, or train with --backend torch"
            ) from None
        hvd.init()
        self.hvd = hvd
        self.rank, self.world_size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.fp16_allreduce = fp16_allreduce
        self.device = pick_device(self.local_rank, device)
        self._ops = {"mean": hvd.Average, "sum": hvd.Sum, "max": hvd.Max}

    # Horovod's collectives return once done, on the GPU too (its wait covers the NCCL op): the host waits.
    def allreduce_(self, tensor, op="mean"):
        with self.watchdog.waiting("allreduce"):
            return self.hvd.allreduce_(tensor, op=self._ops[op])

    def broadcast_(self, tensor, root=0):
        with self.watchdog.waiting("broadcast"):
            return self.hvd.broadcast_(tensor, root_rank=root)

    def allgather(self, tensor):
        with self.watchdog.waiting("allgather"):
            return self.hvd.allgather(tensor.unsqueeze(0))

    def barrier(self):
        with self.watchdog.waiting("barrier"):
            self.hvd.allreduce(torch.zeros(1), op=self.hvd.Sum, name="hpcgan.barrier")

    def shutdown(self):
        self.watchdog.stop()
        self.hvd.shutdown()

    def distributed_optimizer(self, optimizer, module, prefix):
        # fp16 compression: the gradients are cast to fp16, then divided by the world size before the sum
        # (prescale 1/size, postscale 1): summing first overflows fp16's 65504 with AMP-scaled gradients.
        compression = self.hvd.Compression.fp16 if self.fp16_allreduce else self.hvd.Compression.none
        return self.hvd.DistributedOptimizer(
            optimizer,
            named_parameters=module.named_parameters(prefix=prefix),
            compression=compression,
            op=self.hvd.Average,
            gradient_predivide_factor=float(self.world_size) if self.fp16_allreduce else 1.0,
        )

    def synchronize(self, optimizer):
        with self.watchdog.waiting("gradient allreduce"):
            optimizer.synchronize()

    def skip_synchronize(self, optimizer):
        return optimizer.skip_synchronize()

    def broadcast_module(self, module, root=0):
        with self.watchdog.waiting("broadcast"):
            self.hvd.broadcast_parameters(module.state_dict(), root_rank=root)

    def convert_sync_batchnorm(self, module):
        """Replace BatchNorm2d by hvd.SyncBatchNorm (GPU only), keeping parameters and statistics."""
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                sync = self.hvd.SyncBatchNorm(
                    child.num_features,
                    eps=child.eps,
                    momentum=child.momentum,
                    affine=child.affine,
                    track_running_stats=child.track_running_stats,
                )
                sync.load_state_dict(child.state_dict())
                setattr(module, name, sync.to(child.weight.device if child.affine else self.device))
            else:
                self.convert_sync_batchnorm(child)
        return module
