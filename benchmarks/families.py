"""Model families on the sample brains at 64x64, joint image + tissue mask (model.mask_classes=3), 2 ranks,
one equal wall-clock budget each: the selected checkpoint of every family scored by `hpcgan evaluate`
(swd, msssim, memorization and the segmentation task, each beside its real-vs-real baseline), as ONE
table (Markdown, and JSON with --out).

Data: `hpcgan sample-data`, preprocessed as the tests' tissue dataset (TISSUE in tests/conftest.py): t1 with the
3-class `tissue` mask (background, grey matter, white matter: one label set for both brains), axial
slices 60:108 at 64x64, split by subject (MNI152 trains, 48 slices; Colin27 is the validation brain).

The budget is made fair by calibration, not by stopping on a clock: every family first trains a short
run (--calibration-steps, a multiple of 16 so each interval holds the same mix of StyleGAN2's lazy R1 and
path-length steps), the families back to back and in ABBA order over --rounds rounds, so slow spells of
the shared machine hit them alike; its steps/s is the median of the logged intervals after the first
(start-up and warm-up excluded; the median ignores an interval another job slowed). Each family then
trains `--minutes x 60 x steps/s` steps (rounded to whole evaluation intervals). A run stopped by a
timer or a preemption signal would hand any slow spell during training to one family only, count its
evaluations into its budget and stop off the evaluation schedule; a step count is reproducible from
the table (seed + steps) however busy the machine is while the real runs train.

Every run evaluates swd and memorization (eval.num_images images) --evals times, with a checkpoint at
each and the memorisation guard of the demo (checkpoint.max_memorization=0.04): the run's selected
checkpoint (checkpoints/best; checkpoints/latest, said so, when no evaluation passed the guard) is then
scored by `mpirun -np 2 hpcgan evaluate --task segmentation` on the validation split (selection figures:
the guard and `best` chose on these slices, alike for every family). Every process runs one thread.

  .venv/bin/python benchmarks/families.py                      # 5 minutes of training per family
  .venv/bin/python benchmarks/families.py --quick              # smoke run (a few minutes in all)
  .venv/bin/python benchmarks/families.py --minutes 8 --out results --work /tmp/fam
  .venv/bin/python benchmarks/families.py --families stylegan2 --set stylegan2:loss.r1_gamma=1
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import sh

PY = sys.executable
RANKS = 2
# family name -> (config, its --set overrides). Every family trains the same dataset in joint mode (JOINT).
FAMILIES = {
    "wgan-gp": ("wgan-gp-64", ()),
    "stylegan2": ("stylegan2-64", ()),
}
JOINT = ("model.mask_classes=3",)
CLASS_NAMES = "background,grey-matter,white-matter"
METRICS = ("swd", "msssim", "memorization")
GUARD = 0.04
LOG_EVERY = 16  # StyleGAN2's R1 interval: every logged interval holds one R1 step and four path-length steps
EVAL_SEED = 0  # hpcgan evaluate --seed: subsets, pairs, patches, projections and the U-Nets' recipe seed


def mpirun(*args) -> list:
    return ["mpirun", "-np", RANKS, "--oversubscribe", "--bind-to", "none", PY, "-m", "hpcgan", *args]


def make_dataset(root: Path) -> Path:
    """The tests' tissue dataset (module docstring) under `root`, made once."""
    mri, out = root / "mri", root / "data"
    if not (out / "manifest.json").exists():
        sh([PY, "-m", "hpcgan", "sample-data", mri], timeout=600)
        sh(
            [PY, "-m", "hpcgan", "preprocess", "--input", mri, "--output", out, "--modalities", "t1"]
            + "--mask tissue --slices 60:108 --min-brain-fraction 0 --size 64 --val-fraction 0.5 --shards 2".split()
            + ["--class-names", CLASS_NAMES, "--overwrite"],
            timeout=600,
        )
    return out


def train(family, dataset, run_dir, overrides, timeout) -> float:
    """Trains `family` on RANKS ranks in joint mode with `overrides` (after the family's own); its seconds."""
    config, own = FAMILIES[family]
    cmd = mpirun("train", "--config", config, "--data", dataset, "--out", run_dir)
    for kv in (*JOINT, *own, "log.tensorboard=false", f"log.every_steps={LOG_EVERY}", *overrides):
        cmd += ["--set", kv]
    start = time.perf_counter()
    sh(cmd, timeout=timeout)
    return time.perf_counter() - start


def training_lines(run_dir: Path) -> list:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss_d" in r]


def interval_rates(run_dir: Path) -> list:
    """Steps/s of every logged interval but the first (start-up, warm-up), from the lines' wall clocks."""
    lines = training_lines(run_dir)
    return [(b["step"] - a["step"]) / max(b["time_s"] - a["time_s"], 1e-3) for a, b in zip(lines, lines[1:])]


def calibrate(families, dataset, root, steps, rounds, extra) -> dict:
    """{family: steps/s}: the median interval rate of short runs, back to back, in ABBA order (docstring)."""
    rates = {name: [] for name in families}
    for r in range(rounds):
        for name in families if r % 2 == 0 else families[::-1]:
            run_dir = root / f"calibrate-{name}-{r}"
            print(f"calibration round {r + 1}/{rounds}: {name}, {steps} steps ...", file=sys.stderr, flush=True)
            quiet = ("log.sample_every_steps=0", "eval.every_steps=0", "checkpoint.every_steps=0")
            train(name, dataset, run_dir, (f"train.steps={steps}", *quiet, *extra[name]), timeout=1800)
            rates[name] += interval_rates(run_dir)
    return {name: statistics.median(r) for name, r in rates.items()}


def plan(rate, seconds, evals) -> tuple:
    """(steps, eval_every): `seconds` of training at `rate` steps/s, in `evals` whole evaluation intervals."""
    every = max(1, round(rate * seconds / evals))
    return every * evals, every


def selected(run_dir: Path) -> tuple:
    """(what `evaluate --checkpoint` gets, note): the run directory (its selected checkpoint), or
    checkpoints/latest, asked for by name, when no evaluation passed the guard."""
    from hpcgan.training.checkpointing import run_selection

    selection = run_selection(run_dir)
    if selection and selection["file"]:
        return run_dir, "best"
    return run_dir / "checkpoints" / "latest", "latest: no evaluation passed the guard"


def evaluate(dataset, checkpoint, out_json, num_images, budget) -> dict:
    cmd = mpirun("evaluate", "--data", dataset, "--checkpoint", checkpoint, "--out", out_json)
    cmd += ["--metrics", ",".join(METRICS), "--num-images", num_images, "--seed", EVAL_SEED]
    cmd += ["--task", "segmentation"] + (["--budget", budget] if budget else [])
    sh(cmd, timeout=3600)
    return json.loads(Path(out_json).read_text())


def trajectory(run_dir: Path) -> list:
    """[(step, swd, memorization)] of the evaluations during training."""
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["eval"]["swd"]["value"], r["eval"]["memorization"]["value"]) for r in lines if "eval" in r]


def run_family(name, dataset, root, rate, args, extra) -> dict:
    """Trains `name` for its share of the budget, evaluates its selected checkpoint; the table's facts."""
    steps, every = plan(rate, args.minutes * 60, args.evals)
    run_dir = root / f"run-{name}"
    print(f"{name}: training {steps} steps ({rate:.2f} steps/s calibrated) on {RANKS} ranks ...", file=sys.stderr)
    schedule = (f"train.steps={steps}", f"train.seed={args.seed}", f"eval.every_steps={every}")
    schedule += (f"checkpoint.every_steps={every}", f"log.sample_every_steps={every}")
    schedule += ("eval.metrics=[swd,memorization]", f"checkpoint.max_memorization={GUARD}")
    train_s = train(name, dataset, run_dir, (*schedule, *extra[name]), timeout=int(args.minutes * 600) + 3600)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    checkpoint, note = selected(run_dir)
    print(f"{name}: evaluating its selected checkpoint ({note}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    evaluation = evaluate(dataset, checkpoint, run_dir / "evaluation.json", args.num_images, args.budget)
    return {
        "family": name,
        "config": FAMILIES[name][0],
        "overrides": [*JOINT, *FAMILIES[name][1], *extra[name]],
        "steps": steps,
        "eval_every": every,
        "seed": args.seed,
        "calibrated_steps_per_s": rate,
        # from the calibration (ABBA, medians), not the real run: a slow spell during it changes no figure
        "img_per_s_per_rank": rate * config["train"]["batch_size"],
        "train_seconds": train_s,
        "evaluate_seconds": time.perf_counter() - start,
        "selected": {"step": evaluation["generated"]["step"], "how": note},
        "during_training": trajectory(run_dir),
        "last_losses": {k: v for k, v in training_lines(run_dir)[-1].items() if k not in ("epoch", "time_s")},
        "metrics": evaluation["metrics"],
    }


def ratio(value, baseline):
    """value / baseline; a zero baseline (possible for memorisation) makes any non-zero value infinitely far."""
    return value / baseline if baseline else (0.0 if value == 0 else float("inf"))


COLUMNS = ("family", "config", "steps (eval every)", "selected step", "img/s per rank", "SWD", "SWD x real")
COLUMNS += ("MS-SSIM", "memorisation", "Dice synthetic→real", "Dice real+synthetic")


def table_rows(results) -> list:
    """The table's cells: one row per family, then the real-vs-real baselines (the first family's evaluation)."""
    rows = []
    for r in results:
        m, arms = r["metrics"], r["metrics"]["segmentation"]["arms"]
        swd = m["swd"]["value"]
        rows.append(
            [r["family"], r["config"], f"{r['steps']} ({r['eval_every']})"]
            + [f"{r['selected']['step']} ({r['selected']['how'].split(':')[0]})", f"{r['img_per_s_per_rank']:.1f}"]
            + [f"{swd:.1f}", f"{ratio(swd, m['swd']['baseline']):.2f}", f"{m['msssim']['value']:.3f}"]
            + [f"{m['memorization']['value']:.3f}", f"{arms['synthetic']['mean_dice']:.3f}"]
            + [f"{arms['real+synthetic']['mean_dice']:.3f}"]
        )
    m = results[0]["metrics"]
    real_dice = m["segmentation"]["arms"]["real"]["mean_dice"]
    rows.append(
        ["real vs real (baseline)", "", "", "", "", f"{m['swd']['baseline']:.1f}", "1.00"]
        + [f"{m['msssim']['baseline']:.3f}", f"{m['memorization']['baseline']:.3f}", f"{real_dice:.3f} (real→real)", ""]
    )
    return rows


def markdown(results, meta) -> str:
    """The table, then one paragraph: budget, calibrated rates, seeds, what each column is."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    rates = ", ".join(f"{r['family']} {r['calibrated_steps_per_s']:.2f}" for r in results)
    unet_steps = results[0]["metrics"]["segmentation"]["recipe"]["steps"]
    caption = (
        f"Sample brains at 64x64 (48 training slices, one brain; 48 validation slices, another), joint image + "
        f"3-class tissue mask, {RANKS} ranks x 1 thread. Equal budget: {meta['minutes']:g} min of training per "
        f"family at its calibrated rate (steps/s: {rates}; {meta['calibration_steps']}-step runs, "
        f"{meta['rounds']} ABBA round(s)); {meta['evals']} evaluations (swd, memorization) during training, the "
        f"selected checkpoint = lowest SWD with memorisation <= {GUARD} (best; latest when none passed). "
        f"train.seed {meta['seed']}; hpcgan evaluate --seed {EVAL_SEED}, {meta['num_images']} images, validation "
        "split. Lower is better for SWD, MS-SSIM (diversity: far above the baseline = collapse) and memorisation; "
        f"Dice (higher is better): U-Net ({unet_steps} steps) trained on 48 synthetic (or 48 real + 48 synthetic) "
        "pairs, scored on the real validation brain; its baseline is the U-Net trained on the 48 real pairs."
    )
    return "\n".join([*lines, "", caption])


def parse_overrides(items, families) -> dict:
    """--set [FAMILY:]KEY=VALUE -> {family: [KEY=VALUE, ...]}; without FAMILY: for every family."""
    extra = {name: [] for name in families}
    for item in items:
        key, _, value = item.partition("=")
        family, _, key = key.rpartition(":")
        if family and family not in extra:
            sys.exit(f"--set {item}: no family {family!r} in this run ({', '.join(families)})")
        for name in [family] if family else families:
            extra[name].append(f"{key}={value}")
    return extra


def arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per family (default 5)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    parser.add_argument("--set", action="append", default=[], metavar="[FAMILY:]KEY=VALUE", help="extra override")
    parser.add_argument("--evals", type=int, default=10, help="evaluations during each training run (default 10)")
    parser.add_argument("--calibration-steps", type=int, default=80, help="steps of each calibration run")
    parser.add_argument("--rounds", type=int, default=2, help="calibration rounds, ABBA order (default 2)")
    parser.add_argument("--num-images", type=int, default=1000, help="images scored by hpcgan evaluate")
    parser.add_argument("--budget", type=int, default=0, help="U-Net steps per arm (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every family (default 0)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.3 min, 2 evals, 200 images, 20 U-Net steps")
    parser.add_argument("--work", type=Path, help="keep the dataset and runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="write families.md and families.json into this folder")
    args = parser.parse_args()
    if args.quick:
        args.minutes, args.evals, args.num_images, args.budget = 0.3, 2, 200, 20
        args.calibration_steps, args.rounds = 48, 1
    args.families = [f for f in args.families.split(",") if f]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or args.calibration_steps % LOG_EVERY or args.calibration_steps < 3 * LOG_EVERY:
        parser.error(
            f"unknown families {unknown}" if unknown else f"--calibration-steps: a multiple of {LOG_EVERY}, >= 48"
        )
    return args


def main():
    args = arguments()
    extra = parse_overrides(args.set, args.families)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hpcgan-families-") as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        dataset = make_dataset(root)
        start = time.perf_counter()
        rates = calibrate(args.families, dataset, root, args.calibration_steps, args.rounds, extra)
        calibration_s = time.perf_counter() - start
        results = [run_family(name, dataset, root, rates[name], args, extra) for name in args.families]
    meta = {k: getattr(args, k) for k in ("minutes", "calibration_steps", "rounds", "seed", "num_images", "evals")}
    meta.update(ranks=RANKS, guard=GUARD, eval_seed=EVAL_SEED, calibration_s=calibration_s)
    meta["wall_s"] = time.perf_counter() - wall
    table = markdown(results, meta)
    print("\n" + table)
    for r in results:
        shown = ", ".join(f"{s}: {v:.0f}/{m:.2f}" for s, v, m in r["during_training"])
        print(
            f"{r['family']}: train {r['train_seconds']:.0f} s, evaluate {r['evaluate_seconds']:.0f} s; "
            f"during training (step: swd/memorisation) {shown}; last losses {r['last_losses']}"
        )
    print(f"calibration {calibration_s:.0f} s; wall time {meta['wall_s'] / 60:.1f} min")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "families.md").write_text(table + "\n")
        (args.out / "families.json").write_text(json.dumps({"meta": meta, "families": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
