"""Cost of the train-on-synthetic, test-on-real evaluation (hpcgan.segmentation.task_evaluation): seconds
of one evaluation (three U-Nets trained, each scored on the validation pairs) and U-Net training
images/s, at 64² and 256², on 1 and 2 ranks (real mpirun), measured in one run so the ratios are fair
on a noisy machine.

Pairs: the MNI152 slices of the sample data (`hpcgan sample-data`, `hpcgan preprocess --mask seg
--slices 60:108`: grey/white-matter seg, 3 classes); slices 60-83 are the real training pairs, 84-107
the validation pairs, and the "synthetic" pairs are the training pairs flipped and shifted by up to 2
pixels. (The Colin27 subject is left out: its seg is the AAL atlas, another labelling.) The recipe is
the default one (U-Net 16-32-64, batch 16) with a small budget of steps. Every rank runs one thread.

  .venv/bin/python benchmarks/segmentation.py                  # 20 steps per arm at 64² and at 256²
  .venv/bin/python benchmarks/segmentation.py --steps 20 4     # 20 steps at 64², 4 at 256²
  .venv/bin/python benchmarks/segmentation.py --device cuda    # on cuda:<local rank> (2 ranks: 2 GPUs)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import sh

PY = sys.executable
SIZES = (64, 256)


def make_dataset(root: Path, size: int) -> Path:
    mri, out = root / "mri", root / f"data-{size}"
    if not mri.exists():
        sh([PY, "-m", "hpcgan", "sample-data", mri], timeout=3600)
    sh(
        [PY, "-m", "hpcgan", "preprocess", "--input", mri, "--output", out, "--modalities", "t1", "--mask", "seg"]
        + ["--slices", "60:108", "--min-brain-fraction", "0", "--val-fraction", "0.5", "--size", str(size)],
        timeout=3600,
    )
    return out


def pairs(dataset):
    """(train, synthetic, val) pairs of the MNI152 slices (module docstring), deterministic."""
    from hpcgan.data import read_slices

    images, masks = read_slices(dataset, "train", with_masks=True)  # MNI152: the subject with the grey/white-matter seg
    train, val = (images[:24], masks[:24]), (images[24:], masks[24:])
    rng = np.random.default_rng(1)
    shifts = rng.integers(-2, 3, size=(len(train[0]), 2))
    synth_images = np.stack([np.roll(im[..., ::-1], tuple(s), axis=(1, 2)) for im, s in zip(train[0], shifts)])
    synth_masks = np.stack([np.roll(m[..., ::-1], tuple(s), axis=(0, 1)) for m, s in zip(train[1], shifts)])
    return train, (synth_images, synth_masks), val


def worker(dataset, steps, device, out_json):
    """Run under mpirun: every rank loads the same pairs, then times one evaluation between barriers."""
    from hpcgan.parallel import launch_env
    from hpcgan.parallel.backend import pick_device
    from hpcgan.parallel.group import world_group
    from hpcgan.segmentation import SegmentationRecipe, task_evaluation

    group = world_group()
    device = pick_device(launch_env().local_rank, device)
    train, synth, val = pairs(dataset)
    recipe = SegmentationRecipe(steps=steps)
    group.barrier()
    start = time.perf_counter()
    result = task_evaluation(train, synth, val, 3, recipe, group=group, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    group.barrier()
    seconds = time.perf_counter() - start
    if group.is_root:
        result["wall_seconds"] = seconds
        Path(out_json).write_text(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", nargs=2, type=int, default=(20, 20), metavar=("AT_64", "AT_256"))
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu", help="the U-Nets' device, per rank (default cpu)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("DATASET", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.device, args.worker[2])
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size, steps in zip(SIZES, args.steps):
            dataset = make_dataset(root, size)
            for ranks in (1, 2):
                out = root / f"{size}-{ranks}.json"
                mpirun = ["mpirun", "-np", ranks, "--oversubscribe", "--bind-to", "none"]
                sh(mpirun + [PY, __file__, "--worker", dataset, steps, out, "--device", args.device], timeout=7200)
                runs[size, ranks] = json.loads(out.read_text())
    print(
        "task evaluation: 3 arms (24 real, 24 synthetic, 48 union training pairs), 24 validation pairs, "
        f"U-Net 16-32-64, global batch 16, one thread per rank, on {args.device}"
    )
    columns = (("size", 5), ("steps", 6), ("ranks", 6), ("eval s", 8), ("train img/s", 12))
    columns += (("speed-up", 9), ("real Dice", 10))
    print(" ".join(f"{name:>{width}s}" for name, width in columns))
    for size, steps in zip(SIZES, args.steps):
        for ranks in (1, 2):
            run = runs[size, ranks]
            # Training images of the three arms over the arms' seconds (which include predicting the 24
            # validation pairs: a few % of the work).
            rate = 3 * steps * run["recipe"]["batch_size"] / sum(a["seconds"] for a in run["arms"].values())
            speedup = runs[size, 1]["wall_seconds"] / run["wall_seconds"]
            dice = run["arms"]["real"]["mean_dice"]
            print(
                f"{size:5d} {steps:6d} {ranks:6d} {run['wall_seconds']:8.1f} {rate:12.1f} {speedup:8.2f}x "
                f"{dice if dice is None else round(dice, 3)!s:>10s}"
            )


if __name__ == "__main__":
    main()
