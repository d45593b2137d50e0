"""The last words of `make demo` (scripts/demo.sh): where to look, and what the evaluation table means, in plain
words, from the files the demo wrote.

  python -m hpcgan.demo_summary DEMO_DIR STEPS

DEMO_DIR holds run/ (with report.html), samples/ (stack-*.nii.gz, index.json, evaluation.json) and reading/
(the blinded reading session). STEPS is the number of training steps the demo asked for: fewer than the full
demo's are said to be a quick run."""

import glob
import os
import sys
import textwrap

from hpcgan.io import read_json
from hpcgan.metrics import METRICS, baseline_ratio, verdict
from hpcgan.runs import metric_value, read_json_object, read_metrics
from hpcgan.training.checkpointing import passes_memorization_guard, run_selection
from hpcgan.training.run_directory import METRICS_FILE

FULL_STEPS = 1500  # scripts/demo.sh without QUICK=1
GOAL_RATIO = 2.0
WIDTH = 110  # what the demo promises: realism within 2x of real-vs-real, copying within 2x of its baseline


def summary(demo_dir, steps: int) -> str:
    samples = os.path.join(demo_dir, "samples")
    index = read_json_object(os.path.join(samples, "index.json"))
    evaluation = read_json(os.path.join(samples, "evaluation.json"), "evaluation")
    results = evaluation["metrics"]
    stacks = sorted(glob.glob(os.path.join(samples, "stack-?????.nii.gz")))
    generated, real = evaluation.get("generated", {}), evaluation.get("real", {})
    lines = [
        *textwrap.wrap(
            f"Trained {steps} steps on 2 ranks, evaluated every 100 steps against the validation brain. The samples "
            "come from the checkpoint the run selected:",
            WIDTH,
        ),
        f"  {index.get('checkpoint_selection', 'unknown (samples/index.json has no selection)')}",
        *guard_lines(os.path.join(demo_dir, "run")),
        "",
        "Open in a browser:",
        f"  {os.path.join(demo_dir, 'run', 'report.html')}",
        "      the metric curves beside their real-vs-real baselines, sample grids over training, the selected",
        "      checkpoint and why, the evaluation table and the memorisation audit (the nearest training slices)",
        f"  {os.path.join(demo_dir, 'reading', 'index.html')}",
        "      a blinded reading session: tell real slices from generated ones, then `hpcgan turing-test score`",
        "Open in a NIfTI viewer (3D Slicer, ITK-SNAP, FSLeyes, MRIcroGL):",
        *(f"  {path}" for path in stacks),
        "      each 100 generated axial slices (independent slices, not one brain), also as .h5 and .png sheets",
        "",
        *textwrap.wrap(
            f"The evaluation table compares {int(generated.get('count', 0))} generated slices with the "
            f"{int(real.get('val', 0))} slices of the validation brain, which training never saw. Its baseline "
            f"column measures the same between the two real brains ({int(real.get('train', 0))} training slices "
            "against the validation ones): a ratio near 1 means the generated slices are as close to real as one "
            "real brain is to another ('like real data' within 1.5x).",
            WIDTH,
        ),
    ]
    for name in (name for name in METRICS if name in results):
        r = baseline_ratio(name, results[name])
        shown = f"{times(r)} the baseline" if r is not None else "no baseline"
        lines.append(f"  {name:<13} {shown:<19} {verdict(name, results[name]):<22} {METRICS[name].reading}")
    swd, copying = (baseline_ratio(name, results.get(name, {})) for name in ("swd", "memorization"))
    promised = swd is not None and copying is not None and swd <= GOAL_RATIO and copying <= GOAL_RATIO
    lines.append("")
    if promised:
        verdict_line = (
            f"In short: realism within {GOAL_RATIO:g}x of the real baseline and copying within {GOAL_RATIO:g}x of "
            "its own: the model draws new, realistic slices, not copies of its training patient's."
        )
    elif steps < FULL_STEPS:
        verdict_line = (
            f"In short: {steps} steps (QUICK=1) show the pipeline, not the result; `make demo` continues this run "
            f"to {FULL_STEPS} steps, where the generated slices come near the real baselines."
        )
    else:
        verdict_line = (
            f"In short: not there yet (realism {times(swd)}, copying {times(copying)} the baselines; the demo "
            f"expects both within {GOAL_RATIO:g}x); see the report's curves."
        )
    lines += textwrap.wrap(
        f"{verdict_line} One training brain (48 slices) teaches one brain's anatomy: a study trains on many "
        "subjects (README, 'The pipeline').",
        WIDTH,
    )
    return "\n".join(lines)


def guard_lines(run_dir) -> list:
    """What the memorisation guard kept out: the evaluations during training above checkpoint.max_memorization."""
    guard = (run_selection(run_dir) or {}).get("guard")
    if not guard:
        return []
    refused = [
        (entry["step"], value)
        for entry in read_metrics(os.path.join(run_dir, METRICS_FILE))[1]
        if (value := metric_value(entry["eval"].get("memorization"))) is not None
        and not passes_memorization_guard({"memorization": value}, guard)
    ]
    if not refused:
        return [f"  No evaluation copied training slices beyond the guard ({guard:g}): every one could be selected."]
    shown = ", ".join(f"step {step} ({value:.3g})" for step, value in refused)
    return textwrap.wrap(
        f"The memorisation guard kept out the evaluations that copied training slices beyond {guard:g}: {shown}. "
        "The newest checkpoint is not always the one to use.",
        WIDTH,
        initial_indent="  ",
        subsequent_indent="  ",
    )


def times(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m hpcgan.demo_summary DEMO_DIR STEPS", file=sys.stderr)
        return 2
    print(summary(argv[0], int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
