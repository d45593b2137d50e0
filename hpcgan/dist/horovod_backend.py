"""Horovod: MPI or Gloo controller on CPU, NCCL for GPU tensors when built with it.

The GAN pitfalls (../shared/NOTES.md) handled here: one DistributedOptimizer per network with
prefixed parameter names (no DUPLICATE_NAME_ERROR), fp16 compression as an option, and the AMP
order synchronize → unscale → skip_synchronize → step (in Backend.step)."""
import torch

from hpcgan.dist.backend import Backend, pick_device
from hpcgan.errors import HpcganError


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, device: str = "auto", fp16_allreduce: bool = False):
        try:
            import horovod.torch as hvd
        except ImportError as exc:
            raise HpcganError(f"Horovod with PyTorch is not available ({exc}): run `make setup`, "
                              "or train with --backend torch") from None
        hvd.init()
        self.hvd = hvd
        self.rank, self.world_size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.fp16_allreduce = fp16_allreduce
        self.device = pick_device(self.local_rank, device)
        self._ops = {"mean": hvd.Average, "sum": hvd.Sum, "max": hvd.Max}

    def allreduce_(self, tensor, op="mean"):
        return self.hvd.allreduce_(tensor, op=self._ops[op])

    def broadcast_(self, tensor, root=0):
        return self.hvd.broadcast_(tensor, root_rank=root)

    def allgather(self, tensor):
        return self.hvd.allgather(tensor.unsqueeze(0))

    def barrier(self):
        self.hvd.allreduce(torch.zeros(1), op=self.hvd.Sum, name="hpcgan.barrier")

    def shutdown(self):
        self.hvd.shutdown()

    def distributed_optimizer(self, optimizer, module, prefix):
        compression = self.hvd.Compression.fp16 if self.fp16_allreduce else self.hvd.Compression.none
        return self.hvd.DistributedOptimizer(
            optimizer, named_parameters=module.named_parameters(prefix=prefix),
            compression=compression, op=self.hvd.Average)

    def synchronize(self, optimizer):
        optimizer.synchronize()

    def skip_synchronize(self, optimizer):
        return optimizer.skip_synchronize()

    def broadcast_module(self, module, root=0):
        self.hvd.broadcast_parameters(module.state_dict(), root_rank=root)

    def convert_sync_batchnorm(self, module):
        """Replace BatchNorm2d by hvd.SyncBatchNorm (GPU only), keeping parameters and statistics."""
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                sync = self.hvd.SyncBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum,
                                              affine=child.affine, track_running_stats=child.track_running_stats)
                sync.load_state_dict(child.state_dict())
                setattr(module, name, sync.to(child.weight.device if child.affine else self.device))
            else:
                self.convert_sync_batchnorm(child)
        return module
