"""The small interface the training step sees, and the single-process implementation.

A backend is a group (hpcgan.parallel.group) with more on top. It owns: which device this rank
uses, gradient averaging (through `distributed_optimizer` and `step`), broadcasts of parameters
and optimizer state, metric averaging, and object exchange. Objects travel as `torch.save` bytes
and are read back with `weights_only=True`, so nothing received from another rank is unpickled as
code."""

import contextlib
import io
import time

import torch

from hpcgan.parallel.env import launch_env, use_cuda
from hpcgan.parallel.group import Group
from hpcgan.parallel.watchdog import NO_WATCHDOG


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(local_rank: int, preference: str = "auto") -> torch.device:
    """One device per local rank: cuda:<local_rank mod visible GPUs>, or the CPU. UsageError where
    GPUs are expected but missing or shared by ranks (hpcgan.parallel.env.use_cuda)."""
    visible = visible_gpus()
    if not use_cuda(preference, torch.version.cuda, visible):
        return torch.device("cpu")
    index = local_rank % visible  # 0 for every rank when srun gives each task its own GPU
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Backend(Group):
    """Single process. Subclasses override the tensor collectives; everything else is shared."""

    name = "none"
    # Accumulated by step() (class defaults: subclasses set themselves up without Backend.__init__).
    _sync_host_s = 0.0
    _sync_events = ()  # CUDA: (start, end) event pairs around each gradient wait, not yet resolved
    # Marks every collective's wait (hpcgan.parallel.watchdog); make_backend sets it for train.watchdog_s.
    watchdog = NO_WATCHDOG

    def __init__(self, device: str = "auto", fp16_allreduce: bool = False, collective_timeout_s: float = 1800.0):
        env = launch_env()
        self.rank, self.world_size, self.local_rank = 0, 1, env.local_rank
        self.fp16_allreduce = fp16_allreduce
        self.device = pick_device(self.local_rank, device)

    # --- tensor collectives (in place where the name says so) ----------------------------------
    def allreduce_(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        return tensor

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of every rank along a new first dimension."""
        return tensor.unsqueeze(0)

    def shutdown(self):
        self.watchdog.stop()

    # --- gradients -------------------------------------------------------------------------------
    def distributed_optimizer(self, optimizer, module, prefix: str):
        """Wrap `optimizer` so that `step` averages gradients of `module` over ranks. Call while every
        parameter still requires grad (Horovod registers its hooks only for those)."""
        return optimizer

    def synchronize(self, optimizer):
        """Average the gradients held by `optimizer` over ranks (no-op for one process)."""

    def skip_synchronize(self, optimizer):
        return contextlib.nullcontext()

    @property
    def sync_seconds(self) -> float:
        """Seconds spent so far waiting for gradient averaging: the exposed cost of the allreduce. On
        CUDA the GPU's own clock, read here (one wait for the last event) rather than at every step."""
        if self._sync_events:
            self._sync_events[-1][1].synchronize()
            self._sync_host_s += sum(start.elapsed_time(end) for start, end in self._sync_events) / 1000
            self._sync_events = []
        return self._sync_host_s

    def step(self, optimizer, scaler=None):
        """One optimizer step with averaged gradients; with an AMP scaler in the order
        synchronize → unscale → step without a second synchronize → update."""
        if self.device.type == "cuda":
            # A host clock around synchronize() would charge the allreduce with the backward kernels
            # still queued before it (and miss a wait the GPU does after it returns); events on the
            # stream time what the GPU itself waited between the end of backward and averaged gradients.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.synchronize(optimizer)
            end.record()
            vars(self).setdefault("_sync_events", []).append((start, end))
        else:
            t0 = time.perf_counter()
            self.synchronize(optimizer)
            self._sync_host_s += time.perf_counter() - t0  # time the step waits for the gradient allreduce
        if scaler is None:
            with self.skip_synchronize(optimizer):
                optimizer.step()
            return
        scaler.unscale_(optimizer)
        with self.skip_synchronize(optimizer):
            scaler.step(optimizer)
        scaler.update()

    # --- state ---------------------------------------------------------------------------------
    def broadcast_module(self, module: torch.nn.Module, root: int = 0):
        """Parameters and buffers (batch-norm statistics, spectral-norm vectors) from `root`."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                self.broadcast_(tensor, root)

    def averaged_buffers(self, module: torch.nn.Module) -> dict:
        """name → the mean over ranks of each floating-point buffer of `module` (batch-norm running
        statistics), as new tensors: the module keeps its own."""
        with torch.no_grad():
            return {
                name: self.allreduce_(buffer.clone(), "mean")
                for name, buffer in module.named_buffers()
                if buffer.is_floating_point()
            }

    def broadcast_object(self, obj=None, root: int = 0):
        """`obj` (tensors and plain data) from `root` to every rank."""
        if self.world_size == 1:
            return obj
        data = to_bytes(obj) if self.rank == root else b""
        size = self.broadcast_(torch.tensor([len(data)], dtype=torch.int64), root)
        buffer = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.rank == root:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.broadcast_(buffer, root)
        return obj if self.rank == root else from_bytes(buffer.numpy().tobytes())

    def gather_object(self, obj):
        """A list of every rank's `obj` (tensors and plain data), on every rank."""
        if self.world_size == 1:
            return [obj]
        data = to_bytes(obj)
        sizes = self.allgather(torch.tensor([len(data)], dtype=torch.int64)).flatten().tolist()
        buffer = torch.zeros(max(sizes), dtype=torch.uint8)
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = self.allgather(buffer)
        return [from_bytes(gathered[r, : sizes[r]].numpy().tobytes()) for r in range(self.world_size)]

    def mean_metrics(self, metrics: dict) -> dict:
        """Average a dict of scalars over ranks (one collective)."""
        if self.world_size == 1 or not metrics:
            return {k: float(v) for k, v in metrics.items()}
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        self.allreduce_(values, "mean")
        return dict(zip(keys, values.tolist()))

    def convert_sync_batchnorm(self, module: torch.nn.Module) -> torch.nn.Module:
        """One process: its batch statistics are already those of the whole batch."""
        return module

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "world_size": self.world_size,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "device": str(self.device),
        }
