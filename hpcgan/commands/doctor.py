"""Check that this machine (or cluster node) can run hpcgan, and say how to fix what is missing.

Reports Python, torch (CUDA, GPUs), the MPI library, mpi4py, h5py (MPI-enabled or not), nibabel,
Horovod (frameworks, controllers, tensor operations) and Slurm. Under `mpirun -np N` or `srun` it
also runs a real allreduce through hpcgan's backend, checks that every rank sees a world of N
(and, under srun, that N equals SLURM_NTASKS) and names the host of every rank, so a multi-node
run shows that the allreduce crossed nodes. The same collectives then run on the training device
(NCCL on GPUs, with a SyncBatchNorm forward; on a GPU node also for one process), as at every
training start. Exit 1 if the training path cannot work."""

import importlib
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

from hpcgan.log import get_logger
from hpcgan.parallel import launch_env, make_backend, slurm_ntasks


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # a failed required check means training cannot work


def add_arguments(parser):
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "horovod", "torch", "none"),
        help="backend used for the multi-rank check (default: horovod with >1 process)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="device of the multi-rank check, as for `hpcgan train` (default: a GPU when visible)",
    )


def _version(module_name):
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken install raises more than ImportError
        return None, f"{type(exc).__name__}: {exc}"
    return module, getattr(module, "__version__", "?")


def check_python():
    ok = sys.version_info >= (3, 10)
    return Check("python", ok, f"{platform.python_version()} ({sys.executable})", "Python >= 3.10 is needed")


def check_torch():
    torch, version = _version("torch")
    if torch is None:
        return Check("torch", False, version, "run `make setup` (or pip install torch in .venv)")
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        gpus = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"
    elif torch.version.cuda:
        gpus = f"CUDA {torch.version.cuda} build, but no GPU visible (CUDA_VISIBLE_DEVICES, driver?)"
    else:
        gpus = "CPU build (no CUDA)"
    return Check("torch", True, f"{version}, {gpus}")


def check_mpi():
    mpirun = shutil.which("mpirun")
    if not mpirun:
        return Check(
            "mpi",
            False,
            "no mpirun on PATH",
            "load your site's MPI (`module load openmpi`) or, as root, apt-get install openmpi-bin libopenmpi-dev",
            required=launch_env().world_size > 1,
        )
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20).stdout
        first = out.strip().splitlines()[0] if out.strip() else "unknown version"
    except (OSError, subprocess.TimeoutExpired) as exc:
        first = f"mpirun --version failed: {exc}"
    return Check("mpi", True, f"{first} ({mpirun})")


def check_mpi4py():
    mpi4py, version = _version("mpi4py")
    if mpi4py is None:
        return Check("mpi4py", False, version, "run `make setup` (builds mpi4py against the MPI on PATH)")
    from mpi4py import MPI

    library = MPI.Get_library_version().strip().splitlines()[0]
    return Check("mpi4py", True, f"{version}, linked to: {library}")


def check_h5py():
    h5py, version = _version("h5py")
    if h5py is None:
        return Check("h5py", False, version, "pip install h5py")
    mpi = "MPI-enabled" if h5py.get_config().mpi else "serial (fine: each rank writes whole shards)"
    return Check("h5py", True, f"{version}, HDF5 {h5py.version.hdf5_version}, {mpi}")


def check_nibabel():
    nibabel, version = _version("nibabel")
    return Check("nibabel", nibabel is not None, str(version), "pip install nibabel")


def check_horovod():
    hvd, version = _version("horovod.torch")
    if hvd is None:
        return Check(
            "horovod",
            False,
            version,
            "run `make setup` (builds Horovod 0.28.1 for this torch), or train with --backend torch",
        )
    import horovod

    frameworks = ["PyTorch"] + [
        name
        for name, mod in (("TensorFlow", "horovod.tensorflow.mpi_lib"), ("MXNet", "horovod.mxnet.mpi_lib"))
        if _importable(mod)
    ]
    controllers = [n for n, built in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if built]
    ops = controllers + [
        n
        for n, built in (
            ("NCCL", hvd.nccl_built()),
            ("DDL", hvd.ddl_built()),
            ("CCL", hvd.ccl_built()),
            ("CUDA", hvd.cuda_built()),
            ("ROCm", hvd.rocm_built()),
        )
        if built
    ]
    detail = (
        f"{horovod.__version__}; frameworks: {', '.join(frameworks)}; controllers: {', '.join(controllers) or 'none'}; "
        f"tensor operations: {', '.join(ops) or 'none'}"
    )
    import torch

    if torch.cuda.is_available() and not hvd.nccl_built():
        return Check(
            "horovod", False, detail, "GPUs present but Horovod has no NCCL: rebuild with `make setup` on a GPU node"
        )
    if not controllers:
        return Check("horovod", False, detail, "Horovod was built without MPI or Gloo: rebuild with `make setup`")
    return Check("horovod", True, detail)


def _importable(name):
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def _gpu_visible() -> bool:
    torch, _ = _version("torch")  # no torch, or a broken one: check_torch says so
    return torch is not None and torch.cuda.is_available() and torch.cuda.device_count() > 0


def check_slurm():
    env = os.environ
    if "SLURM_JOB_ID" in env:
        where = f"inside Slurm job {env['SLURM_JOB_ID']}"
        ntasks = slurm_ntasks()
        if ntasks:
            where += f", srun step with SLURM_NTASKS={ntasks}"
    else:
        where = "not inside a Slurm job"
    tools = "sbatch found" if shutil.which("sbatch") else "no sbatch on PATH"
    return Check("slurm", True, f"{where}; {tools}", required=False)


def check_world(backend_name, device="auto"):
    """A real allreduce through hpcgan's backend: every rank must see the launcher's world. Then the
    same collectives on the training device (NCCL on GPUs, with a SyncBatchNorm forward), as every
    training start runs them."""
    # Here, not above: doctor must also run (and say so) where torch is missing or broken.
    import torch

    from hpcgan.parallel.device_check import check_device_collectives

    try:
        backend = make_backend(backend_name, device=device)
        on_device = check_device_collectives(backend, sync_bn=True)
    except Exception as exc:
        return Check(
            "world", False, f"{type(exc).__name__}: {exc}", "see the message; `hpcgan doctor` under 1 process first"
        )
    total = backend.allreduce_(torch.tensor([float(backend.rank + 1)]), "sum").item()
    sizes = backend.gather_object(backend.world_size)
    hosts = backend.gather_object(socket.gethostname())
    backend.barrier()
    expected = backend.world_size * (backend.world_size + 1) / 2
    ntasks = slurm_ntasks()
    ok = (
        total == expected
        and all(s == backend.world_size for s in sizes)
        and (ntasks is None or ntasks == backend.world_size)
    )
    ranks_on = {host: [r for r, h in enumerate(hosts) if h == host] for host in dict.fromkeys(hosts)}
    placement = "; ".join(f"{host}: ranks {','.join(map(str, ranks))}" for host, ranks in ranks_on.items())
    detail = (
        f"{backend.name} backend: world of {backend.world_size}, ranks report sizes {sizes}, "
        f"allreduce sum {total:g} (expected {expected:g}) across {len(ranks_on)} host(s) ({placement})"
        + (f", SLURM_NTASKS={ntasks}" if ntasks else "")
        + f"; {on_device}"
    )
    fix = "" if ok else "ranks disagree on the world: check the MPI/PMI set-up (srun --mpi=pmix, same MPI as mpi4py)"
    return Check("world", ok, detail, fix), backend


def run(args):
    env = launch_env()
    checks = [
        check_python(),
        check_torch(),
        check_mpi(),
        check_mpi4py(),
        check_h5py(),
        check_nibabel(),
        check_horovod(),
        check_slurm(),
    ]
    backend = None
    if env.world_size > 1 or (args.device != "cpu" and _gpu_visible()):  # on a GPU: NCCL even for 1 rank
        result = check_world(args.backend, args.device)
        check, backend = result if isinstance(result, tuple) else (result, None)
        checks.append(check)
        get_logger("doctor").debug("this rank: %s", ", ".join(f"{c.name} {'ok' if c.ok else 'FAIL'}" for c in checks))
        if backend is not None:
            everyone = backend.gather_object([c.ok for c in checks])
            if not all(all(r) for r in everyone):
                bad = [r for r, flags in enumerate(everyone) if not all(flags)]
                checks.append(Check("ranks", False, f"checks failed on ranks {bad}", "run hpcgan doctor --debug"))
    if env.rank == 0:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            print(f"{mark} {c.name:<{width}}  {c.detail}")
            if not c.ok and c.fix:
                print(f"     {'':<{width}}  fix: {c.fix}")
    failed = [c.name for c in checks if not c.ok and c.required]
    if env.rank == 0:
        print("training path: " + ("ready" if not failed else f"NOT ready ({', '.join(failed)})"))
    sys.stdout.flush()
    if env.world_size > 1 and backend is not None:
        backend.shutdown()
    return 1 if failed else 0
