"""Small data without memorisation: `wgan-gp-64` on the sample data (one training brain, 48 slices of
64x64; one validation brain; a test brain) on 2 ranks for the same number of steps, twice, measured in one run:
  (A) baseline: no augmentation, checkpoints/best = lowest SWD;
  (B) ADA (train.ada_target=0.6) + memorisation guard (checkpoint.max_memorization, default 0.04: twice the
      validation baseline of 1/48 = 0.021, i.e. the goal itself), best = lowest SWD among guarded evaluations.
Both evaluate swd and memorization every --eval-every steps with a checkpoint at each evaluation. The
SELECTED checkpoint of each arm (what `hpcgan evaluate --checkpoint RUN` takes: checkpoints/best; in B,
latest, asked for by name, when no evaluation passed the guard) is then scored by `hpcgan evaluate` (1000
images; swd, msssim, intensity, memorization) beside the real-vs-real baselines, twice:
  --split val   the validation brain the checkpoint was selected on (selection figures: optimistic by
                construction, since the guard and `best` chose on these very slices);
  --split test  a third subject that training, its evaluation and the guard never read (preprocess
                --test-fraction): the FINAL figures, the ones the goal is judged on.
The sample data holds two brains, so the test subject is the validation brain (Colin27) mirrored left to
right: other slices than any the selection saw, though not another person's anatomy. Goal: memorisation
within 2x of its held-out baseline while SWD is within 2x of the real-vs-real baseline. Every process runs
one thread (OMP_NUM_THREADS=1), so 2 ranks need 2 free cores.

  .venv/bin/python benchmarks/small_data.py             # 1500 steps per arm (10-20 minutes on 2 cores)
  .venv/bin/python benchmarks/small_data.py --quick     # 100 steps per arm (a smoke run, a few minutes)
  .venv/bin/python benchmarks/small_data.py --steps 3000 --eval-every 250
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from harness import sh

from hpcgan.errors import UsageError
from hpcgan.preprocess.plan import split_subjects
from hpcgan.training.checkpointing import read_index, select_checkpoint

PY = sys.executable
METRICS = ("swd", "msssim", "intensity", "memorization")
GOAL_RATIO = 2.0
# The held-out splits each selected checkpoint is scored on: val, what it was selected on; test, the final figures.
SCORED = {"val": "validation split (selection figures)", "test": "test split (FINAL figures)"}


# Subject → split: the training and validation brains as in the tests' sample_dataset, and the test subject.
SPLITS = {"mni152": "train", "colin27": "val", "colin27-mirrored": "test"}


def split_seed() -> int:
    """The first preprocess --seed that puts each subject of SPLITS in its split."""
    fractions = dict(val_fraction=1 / 3, test_fraction=1 / 3)
    return next(seed for seed in range(1000) if split_subjects(sorted(SPLITS), seed=seed, **fractions) == SPLITS)


def make_dataset(root: Path) -> Path:
    """The sample brains preprocessed like the tests' sample_dataset (tests/conftest.py), plus a test split: the
    validation brain mirrored left to right (its voxel x axis), t1 and seg alike."""
    import nibabel as nib
    import numpy as np

    mri, out = root / "mri", root / "data"
    sh([PY, "-m", "hpcgan", "sample-data", mri], timeout=600)
    (mri / "colin27-mirrored").mkdir()
    for modality in ("t1", "seg"):
        image = nib.load(mri / "colin27" / f"colin27_{modality}.nii.gz")
        mirrored = np.ascontiguousarray(np.asanyarray(image.dataobj)[::-1])
        path = mri / "colin27-mirrored" / f"colin27-mirrored_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(mirrored, image.affine, image.header), path)
    sh(
        [PY, "-m", "hpcgan", "preprocess", "--input", mri, "--output", out, "--modalities", "t1", "--mask", "seg"]
        + "--slices 60:108 --min-brain-fraction 0 --size 64".split()
        + ["--val-fraction", 1 / 3, "--test-fraction", 1 / 3, "--seed", split_seed()],
        timeout=600,
    )
    return out


def train(dataset, run_dir, steps, eval_every, extra=()):
    cmd = ["mpirun", "-np", 2, "--oversubscribe", "--bind-to", "none", PY, "-m", "hpcgan", "train"]
    cmd += ["--config", "wgan-gp-64", "--data", dataset, "--out", run_dir]
    for kv in (
        f"train.steps={steps}",
        f"eval.every_steps={eval_every}",
        f"checkpoint.every_steps={eval_every}",  # every evaluation has a checkpoint, so it can be selected
        "eval.metrics=[swd,memorization]",
        "log.sample_every_steps=0",
        "log.tensorboard=false",
        *extra,
    ):
        cmd += ["--set", kv]
    start = time.perf_counter()
    sh(cmd, timeout=6 * 3600)
    return time.perf_counter() - start


def selected_checkpoint(run_dir: Path):
    """(path, note): the run's selected checkpoint (select_checkpoint, as `evaluate --checkpoint RUN`), else
    checkpoints/latest, asked for by name, when no evaluation passed the guard."""
    try:
        path, reason = select_checkpoint(run_dir)
    except UsageError:
        path, _ = select_checkpoint(run_dir / "checkpoints" / "latest")
        return path, "latest: no evaluation passed the guard"
    return path, f"best: {reason}"


def trajectory(run_dir: Path):
    """[(step, swd, memorization)] of the evaluations during training, and the last logged ADA p."""
    evals, aug_p = [], None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            evals.append((rec["step"], rec["eval"]["swd"]["value"], rec["eval"]["memorization"]["value"]))
        aug_p = rec.get("aug_p", aug_p)
    return evals, aug_p


def evaluate(dataset, checkpoint, out_json, num_images, split):
    sh(
        [PY, "-m", "hpcgan", "evaluate", "--data", dataset, "--checkpoint", checkpoint, "--out", out_json]
        + ["--metrics", ",".join(METRICS), "--num-images", num_images, "--split", split],
        timeout=3600,
    )
    return json.loads(Path(out_json).read_text())["metrics"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="training steps per arm (default 1500)")
    parser.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default steps/15)")
    parser.add_argument("--quick", action="store_true", help="100 steps per arm, 200 images scored (smoke run)")
    parser.add_argument("--max-memorization", type=float, default=0.04, help="arm B's guard (default 0.04)")
    parser.add_argument("--num-images", type=int, default=1000, help="images generated for the final scores")
    args = parser.parse_args()
    steps = 100 if args.quick else args.steps
    num_images = 200 if args.quick else args.num_images
    eval_every = args.eval_every or (25 if args.quick else max(1, steps // 15))
    arms = {
        "A baseline": [],
        "B ADA+guard": [
            "train.ada_target=0.6",
            f"checkpoint.max_memorization={args.max_memorization}",
        ],
    }
    results = {}
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hpcgan-bench-") as tmp:
        tmp = Path(tmp)
        dataset = make_dataset(tmp)
        for i, (name, extra) in enumerate(arms.items()):
            run_dir = tmp / f"run{i}"
            print(f"{name}: training {steps} steps on 2 ranks ...", file=sys.stderr, flush=True)
            seconds = train(dataset, run_dir, steps, eval_every, extra)
            ckpt, note = selected_checkpoint(run_dir)
            evals, aug_p = trajectory(run_dir)
            scores = {s: evaluate(dataset, ckpt, tmp / f"eval{i}-{s}.json", num_images, s) for s in SCORED}
            step = next(entry["step"] for entry in read_index(ckpt.parent) if entry["file"] == ckpt.name)
            results[name] = dict(seconds=seconds, note=note, step=step, evals=evals, aug_p=aug_p, scores=scores)
    report(results, steps, eval_every, num_images, args.max_memorization, time.perf_counter() - wall)


def ratio(value, baseline):
    """value / baseline; a zero baseline (possible for memorisation) makes any non-zero value infinitely far."""
    return value / baseline if baseline else (0.0 if value == 0 else float("inf"))


def report(results, steps, eval_every, num_images, guard, wall):
    print()
    print(
        f"wgan-gp-64 on the sample data (48 training slices of 64x64), 2 ranks, {steps} steps per arm, "
        f"evaluated every {eval_every}; B: train.ada_target=0.6, checkpoint.max_memorization={guard}"
    )
    for name, r in results.items():
        aug = f", final aug_p {r['aug_p']:.3f}" if r["aug_p"] is not None else ""
        print(f"{name}: selected step {r['step']} ({r['note']}), training {r['seconds']:.0f} s{aug}")
        print(
            "  during training (step: swd / memorization of 128 images): "
            + ", ".join(f"{s}: {v:.0f}/{m:.2f}" for s, v, m in r["evals"])
        )
    for split, title in SCORED.items():
        scored_by = f"hpcgan evaluate --split {split}, {num_images} images"
        score_table(results, split, f"selected checkpoints scored by {scored_by}: {title}")
    print(
        f"goal: memorization <= {GOAL_RATIO:g}x its held-out baseline and swd <= {GOAL_RATIO:g}x real-vs-real "
        "(msssim below baseline = more diverse than real pairs; far above = mode collapse); judged on the test split"
    )
    for name, r in results.items():
        ratios = {split: goal_ratios(r["scores"][split]) for split in SCORED}
        shown = "; ".join(f"{split}: memorization {mem:.2f}x, swd {swd:.2f}x" for split, (mem, swd) in ratios.items())
        met = all(x <= GOAL_RATIO for x in ratios["test"])
        print(f"  {name}: {shown} -> goal {'met' if met else 'not met'} (on the test split)")
    print(f"wall time {wall / 60:.1f} min")
    sys.stdout.flush()


def goal_ratios(metrics) -> tuple:
    """(memorization, swd), each as a multiple of its real-vs-real baseline."""
    return tuple(ratio(metrics[name]["value"], metrics[name]["baseline"]) for name in ("memorization", "swd"))


def score_table(results, split, title):
    """One row per metric: the real-vs-real baseline on `split`, and each arm's value and its ratio to it."""
    first = next(iter(results.values()))["scores"][split]
    print(f"\n{title}; lower is better for all")
    header = f"{'metric':13s} {'real-vs-real':>12s}"
    for name in results:
        header += f" {name:>12s} {'x baseline':>10s}"
    print(header)
    for metric in METRICS:
        base = first[metric]["baseline"]
        row = f"{metric:13s} {base:12.4g}"
        for r in results.values():
            value = r["scores"][split][metric]["value"]
            row += f" {value:12.4g} {ratio(value, base):10.2f}"
        print(row)


if __name__ == "__main__":
    main()
