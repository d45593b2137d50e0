"""Checkpoint stall and sampling throughput of the 256x256x3 study model (configs/cepa2023.yaml).

Measured in one run, for G + D + G_ema + both Adam states after one real optimizer step:
  - the training stall per checkpoint with CheckpointWriter (submit: copy to host memory, start the
    background write) against a synchronous torch.save + fsync of the same state (goal: stall <= 10%
    of the synchronous save); the first checkpoint allocates the host copy, later ones reuse it
    (median of those);
  - the checkpoint size in MB;
  - sampling throughput of `generate_images` (images/s) for stacks of 100 images at 256x256, on 1 and
    2 ranks under mpirun, one thread per rank (each rank renders one stack of its own).

  .venv/bin/python benchmarks/checkpoint.py            # full (a few minutes on 2 cores)
  .venv/bin/python benchmarks/checkpoint.py --quick    # smoke run: 3 checkpoints, stacks of 10
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import single_thread_env

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpcgan.training.checkpointing import CheckpointWriter  # noqa: E402
from hpcgan.training.state import capture_rng_state  # noqa: E402
from hpcgan.config import build, read_yaml, resolve_config_path, to_dict  # noqa: E402
from hpcgan.models import build_discriminator, build_generator  # noqa: E402
from hpcgan.models.config import ModelConfig  # noqa: E402


def study_model() -> ModelConfig:
    return build(ModelConfig, read_yaml(resolve_config_path("cepa2023"))["model"], "cepa2023", "model.")


def trained_state(cfg: ModelConfig, batch: int = 2) -> dict:
    """The state a training run checkpoints, after one real WGAN step of D and of G."""
    torch.manual_seed(0)
    G, D = build_generator(cfg), build_discriminator(cfg)
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(batch, cfg.channels, cfg.resolution, cfg.resolution) * 2 - 1
    z = torch.randn(batch, cfg.latent_dim)
    loss_D = D(G(z).detach()).mean() - D(real).mean()
    loss_D.backward()
    opt_D.step()
    D.requires_grad_(False)
    loss_G = -D(G(z)).mean()
    opt_G.zero_grad()
    loss_G.backward()
    opt_G.step()
    D.requires_grad_(True)
    G_ema = copy.deepcopy(G)
    return {
        "hpcgan_version": "bench",
        "config": {"model": to_dict(cfg)},
        "step": 1,
        "epoch": 0,
        "batch_in_epoch": 1,
        "dataset": {
            "image_shape": [cfg.channels, cfg.resolution, cfg.resolution],
            "pixel_spacing_mm": [1.0, 1.0],
            "slice_thickness_mm": 1.0,
            "intensity": {"lo": 0.0, "hi": 255.0},
        },
        "G": G.state_dict(),
        "D": D.state_dict(),
        "G_ema": G_ema.state_dict(),
        "opt_G": opt_G.state_dict(),
        "opt_D": opt_D.state_dict(),
        "scaler_G": None,
        "scaler_D": None,
        "rng": [capture_rng_state()],
    }


def synchronous_save(state, path) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def measure_checkpoints(state, directory: Path, repeats: int):
    sync = [synchronous_save(state, directory / "sync.pt") for _ in range(repeats)]
    size_mb = (directory / "sync.pt").stat().st_size / 1e6
    (directory / "sync.pt").unlink()
    writer = CheckpointWriter(directory / "checkpoints", keep_last=2)
    stalls, totals = [], []
    for step in range(1, repeats + 1):
        writer.flush()  # the previous write is done, as with any sane checkpoint interval
        t0 = time.perf_counter()
        writer.submit(state, step)
        stalls.append(time.perf_counter() - t0)
        writer.flush()
        totals.append(time.perf_counter() - t0)
    writer.close()
    # the first submit allocates the host copy; later ones copy into it (the steady state of a run)
    return statistics.median(sync), stalls[0], statistics.median(stalls[1:]), statistics.median(totals), size_mb


def sampling_worker(checkpoint: str, images: int):
    """Run under mpirun: each rank renders one stack; rank 0 prints images/s of the whole job."""
    from hpcgan.parallel import mpi_comm
    from hpcgan.generation import generate_images, load_generator

    comm = mpi_comm()
    G = load_generator(checkpoint, ema=True, device="cpu")
    generate_images(G, range(2), 0)  # warm-up
    comm.Barrier()
    t0 = time.perf_counter()
    generate_images(G, range(comm.rank * images, (comm.rank + 1) * images), 0, batch_size=50)
    comm.Barrier()
    seconds = time.perf_counter() - t0
    if comm.rank == 0:
        print(json.dumps({"images": images * comm.size, "seconds": seconds}))


def measure_sampling(checkpoint: Path, ranks: int, images: int) -> float:
    cmd = [
        "mpirun",
        "-np",
        str(ranks),
        "--oversubscribe",
        "--bind-to",
        "none",
        sys.executable,
        __file__,
        "--sampling-worker",
        str(checkpoint),
        "--images",
        str(images),
    ]
    result = subprocess.run(cmd, env=single_thread_env(), capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"sampling on {ranks} ranks failed:\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["images"] / out["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 checkpoints, stacks of 10 images")
    parser.add_argument("--sampling-worker", metavar="CKPT", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sampling_worker:
        return sampling_worker(args.sampling_worker, args.images)

    repeats, stack = (3, 10) if args.quick else (6, 100)
    cfg = study_model()
    state = trained_state(cfg)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:  # the repository's disk, where runs usually live
        tmp = Path(tmp)
        sync, first_stall, stall, total, size_mb = measure_checkpoints(state, tmp, repeats)
        checkpoint = tmp / "checkpoints" / f"ckpt-{repeats:08d}.pt"
        one = measure_sampling(checkpoint, 1, stack)
        two = measure_sampling(checkpoint, 2, stack)
    rows = [
        ("checkpoint size", f"{size_mb:.0f} MB", ""),
        ("synchronous torch.save + fsync", f"{sync:.2f} s", "1.00"),
        ("training stall, first checkpoint (allocates)", f"{first_stall:.3f} s", f"{first_stall / sync:.3f}"),
        ("training stall per checkpoint after that", f"{stall:.3f} s", f"{stall / sync:.3f} (goal <= 0.10)"),
        ("CheckpointWriter background write", f"{total:.2f} s", f"{total / sync:.2f}"),
        (f"sampling, 1 rank x 1 thread, stack of {stack}", f"{one:.2f} images/s", "1.00"),
        ("sampling, 2 ranks x 1 thread, a stack each", f"{two:.2f} images/s", f"{two / one:.2f}"),
    ]
    print(
        f"cepa2023 256x256x3, G+D+G_ema+2 Adam states, {repeats} checkpoints, torch {torch.__version__}, "
        f"{os.cpu_count()} cores"
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>16}  ratio")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>16}  {ratio}")


if __name__ == "__main__":
    main()
