"""Evaluation cost: seconds to score N generated images against N real ones, per metric, on 1
and 2 ranks (real mpirun), measured in one run so the ratios are fair on a noisy machine.

Images: real brain slices of the sample data (`hpcgan sample-data`, `hpcgan preprocess --size
256`: MNI152 in train, Colin27 in val), each repeated with a random shift of up to 2 pixels and
Gaussian noise (σ 0.02) until there are N: "generated" = perturbed validation slices, "real" =
perturbed training slices and the validation slices. FID is left out: it needs Inception weights
this machine does not have. Every rank runs one thread (OMP_NUM_THREADS=1).

  .venv/bin/python benchmarks/evaluate.py            # 1,000 images of 256², 1 and 2 ranks
  .venv/bin/python benchmarks/evaluate.py --quick    # 200 images of 128²
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import sh

PY = sys.executable
METRICS = ("swd", "msssim", "intensity", "memorization")


def make_dataset(root: Path, size: int) -> Path:
    mri, out = root / "mri", root / f"data-{size}"
    sh([PY, "-m", "hpcgan", "sample-data", mri], timeout=3600)
    sh(
        [
            PY,
            "-m",
            "hpcgan",
            "preprocess",
            "--input",
            mri,
            "--output",
            out,
            "--modalities",
            "t1",
            "--slices",
            "30:160",
            "--val-fraction",
            "0.5",
            "--size",
            str(size),
        ],
        timeout=3600,
    )
    return out


def perturbed(images, n, seed):
    """n images: `images` cycled, each rolled by up to 2 pixels plus noise σ 0.02 (deterministic)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, *images.shape[1:]), np.float32)
    for i in range(n):
        moved = np.roll(images[i % len(images)], tuple(rng.integers(-2, 3, size=2)), axis=(1, 2))
        out[i] = np.clip(moved + rng.normal(0, 0.02, moved.shape), -1, 1)
    return out


def worker(dataset, n, out_json):
    """Run under mpirun: every rank builds the same sets, then times each metric between barriers."""
    from hpcgan.data import read_slices
    from hpcgan.metrics import evaluate
    from hpcgan.parallel.group import world_group

    group = world_group()
    train, val = read_slices(dataset, "train"), read_slices(dataset, "val")
    fake, real, val = perturbed(val, n, 1), perturbed(train, n, 2), val[:n]
    seconds = {}
    for name in METRICS:
        group.barrier()
        start = time.perf_counter()
        evaluate(fake, real, val, metrics=(name,), group=group)
        group.barrier()
        seconds[name] = time.perf_counter() - start
    if group.is_root:
        Path(out_json).write_text(json.dumps({"seconds": seconds, "shape": list(fake.shape), "val": len(val)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 images of 128² (a smoke run)")
    parser.add_argument("--worker", nargs=3, metavar=("DATASET", "N", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.worker[2])
    n, size = (200, 128) if args.quick else (1000, 256)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = make_dataset(root, size)
        runs = {}
        for ranks in (1, 2):
            out = root / f"ranks{ranks}.json"
            sh(
                [
                    "mpirun",
                    "-np",
                    ranks,
                    "--oversubscribe",
                    "--bind-to",
                    "none",
                    PY,
                    __file__,
                    "--worker",
                    dataset,
                    n,
                    out,
                ],
                timeout=3600,
            )
            runs[ranks] = json.loads(out.read_text())
    shape = runs[1]["shape"]
    print(
        f"evaluate: {shape[0]} generated vs {shape[0]} real images of {shape[2]}x{shape[3]} "
        f"(+{runs[1]['val']} val slices for the baseline); perturbed real slices; one thread per rank"
    )
    print(f"{'metric':14s} {'1 rank s':>9s} {'2 ranks s':>10s} {'speed-up':>9s}")
    for name in (*METRICS, "total"):
        one = sum(runs[1]["seconds"].values()) if name == "total" else runs[1]["seconds"][name]
        two = sum(runs[2]["seconds"].values()) if name == "total" else runs[2]["seconds"][name]
        print(f"{name:14s} {one:9.2f} {two:10.2f} {one / two:8.2f}x")


if __name__ == "__main__":
    main()
