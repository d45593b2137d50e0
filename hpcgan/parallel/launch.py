"""Starting the distributed side of a command: MPI (with the settings it needs before it starts) and
the training backend, with the checks that every rank sees the world and the GPUs the launcher made."""

from hpcgan.errors import HpcganError, UsageError
from hpcgan.parallel.env import launch_env, slurm_ntasks, slurm_threads, use_cuda
from hpcgan.parallel.mpi import yield_when_idle
from hpcgan.parallel.watchdog import start_watchdog


BACKENDS = ("auto", "horovod", "torch", "none")


def make_backend(
    name: str = "auto",
    device: str = "auto",
    fp16_allreduce: bool = False,
    collective_timeout_s: float = 1800.0,
    watchdog_s: float = 0.0,
):
    """Start the backend for this job and check that every rank sees the world the launcher made. With
    `watchdog_s` a rank that waits that long in one collective ends itself (hpcgan.parallel.watchdog)."""
    # The backend modules import torch (and Horovod or torch.distributed) here, not at the top: hpcgan.parallel
    # is imported by light commands and by the CLI's error path, which must not pay for torch.
    env = launch_env()
    if name == "auto":
        name = "horovod" if env.world_size > 1 else "none"
    if name == "none":
        if env.world_size > 1:
            raise UsageError(f"--backend none: the launcher started {env.world_size} processes; use horovod or torch")
        from hpcgan.parallel.backend import Backend as cls
    elif name == "horovod":
        from hpcgan.parallel.horovod_backend import HorovodBackend as cls
    elif name == "torch":
        from hpcgan.parallel.torch_backend import TorchBackend as cls
    else:
        raise UsageError(f"--backend {name}: expected one of {', '.join(BACKENDS)}")
    import torch

    from hpcgan.parallel.backend import visible_gpus

    use_cuda(device, torch.version.cuda, visible_gpus())  # refuse a missing or shared GPU before MPI starts
    threads = slurm_threads()
    if threads:  # torch would take every core of the node, not the ones Slurm gave this rank
        torch.set_num_threads(threads)
    yield_when_idle()
    backend = cls(device=device, fp16_allreduce=fp16_allreduce, collective_timeout_s=collective_timeout_s)
    expected = slurm_ntasks() or env.world_size  # under `srun torchrun` that is WORLD_SIZE (slurm_ntasks)
    if backend.world_size != expected:
        raise HpcganError(
            f"{name} backend sees a world of {backend.world_size} processes but the launcher started {expected}: "
            "MPI was not initialised through the launcher (under Slurm use `srun --mpi=pmix` with an MPI built "
            "with PMIx/Slurm support, or mpirun inside the allocation)"
        )
    backend.watchdog = start_watchdog(watchdog_s, backend.rank, backend.world_size)
    return backend
