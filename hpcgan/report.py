"""Write a self-contained HTML report of a training run: loss curves, metric curves, sample grids
over time, the selected (best) checkpoint with its memorisation guard, the last stack's contact sheet,
the memorisation audit with its worst pairs, the config and the environment.

  hpcgan report RUN_DIR                                   # → RUN_DIR/report.html
  hpcgan report RUN_DIR --samples SAMPLES_DIR --evaluation SAMPLES_DIR/evaluation.json

Reads RUN_DIR/metrics.jsonl, config.yaml, env.json and samples/grid-*.png; the contact sheet comes
from --samples (its newest stack-*.png, else one drawn from its newest stack-*.h5) or the newest
stack-*.png under RUN_DIR; the evaluation from --evaluation or RUN_DIR/evaluation.json; the visual Turing
test's scores from --turing-test or RUN_DIR/turing-test.json (`hpcgan turing-test score`). Figures are
PNGs in RUN_DIR/report/, referenced by relative paths; missing parts are said so on the page."""

import glob
import html
import json
import os
import re

from hpcgan.errors import UsageError
from hpcgan.io import read_json, read_jsonl
from hpcgan.log import get_logger

log = get_logger("report")

MAX_GRIDS = 6


def add_arguments(parser):
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by hpcgan train")
    parser.add_argument("--out", metavar="HTML", help="the page (default: RUN_DIR/report.html)")
    parser.add_argument("--samples", metavar="SAMPLES_DIR", help="a directory written by hpcgan sample")
    parser.add_argument(
        "--evaluation", metavar="JSON", help="written by hpcgan evaluate (default: RUN_DIR/evaluation.json if present)"
    )
    parser.add_argument(
        "--turing-test",
        metavar="JSON",
        help="written by hpcgan turing-test score (default: RUN_DIR/turing-test.json if present)",
    )


# ---------------------------------------------------------------- reading the run


def read_metrics(path) -> tuple:
    """(training lines, evaluation lines) of metrics.jsonl; a torn last line (a killed run) and
    unreadable lines are skipped with a warning (hpcgan.io.read_jsonl)."""
    train, evals = [], []
    for entry in read_jsonl(path):
        if isinstance(entry.get("step"), (int, float)):
            (evals if isinstance(entry.get("eval"), dict) else train).append(entry)
    return train, evals


def grid_steps(run_dir) -> list:
    """[(step, path)] of samples/grid-<step>.png, in step order."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "samples", "grid-*.png")):
        match = re.fullmatch(r"grid-(\d+)\.png", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def evenly_spaced(items: list, k: int) -> list:
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def newest(paths):
    return max(paths, key=lambda p: (os.path.getmtime(p), p)) if paths else None


def selected_checkpoint(run_dir) -> dict | None:
    """The checkpoint a run selected (checkpoints/best) and what it was selected by: {"metric":
    checkpoint.best_metric, "guard": checkpoint.max_memorization or None, "checkpoints": how many are indexed,
    "file", "step", "metrics"} (file and step None when none is best, e.g. none passed the memorisation guard).
    None for a run without evaluation during training (nothing to select by)."""
    import yaml

    from hpcgan.checkpoint import CHECKPOINTS_DIR, read_index, read_pointer

    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict) or not (config.get("eval") or {}).get("every_steps"):
        return None
    ck = config.get("checkpoint") or {}
    directory = os.path.join(run_dir, CHECKPOINTS_DIR)
    entries = read_index(directory) if os.path.isdir(directory) else []
    name = read_pointer(os.path.join(directory, "best"))
    entry = next((e for e in entries if e.get("file") == name), None) if name else None
    return {
        "metric": ck.get("best_metric", "swd"),
        "guard": ck.get("max_memorization") or None,
        "checkpoints": len(entries),
        "file": entry["file"] if entry else None,
        "step": entry.get("step") if entry else None,
        "metrics": dict(entry.get("metrics") or {}) if entry else {},
    }


# ---------------------------------------------------------------- figures


def save_figure(fig, path):
    from hpcgan.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def loss_figure(train, path) -> bool:
    import matplotlib.pyplot as plt

    keys = sorted({k for e in train for k, v in e.items() if k.startswith("loss") and isinstance(v, (int, float))})
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in keys:
        points = [(e["step"], e[key]) for e in train if isinstance(e.get(key), (int, float))]
        ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def metric_figure(evals, path) -> bool:
    """One panel per metric: its value over the steps, the real-vs-real baseline dashed."""
    import matplotlib.pyplot as plt

    names = sorted(
        {
            n
            for e in evals
            for n, r in e["eval"].items()
            if isinstance(r, dict) and isinstance(r.get("value"), (int, float))
        }
    )
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [
            (e["step"], e["eval"][name])
            for e in evals
            if isinstance(e["eval"].get(name), dict) and isinstance(e["eval"][name].get("value"), (int, float))
        ]
        ax.plot([s for s, _ in rows], [r["value"] for _, r in rows], marker="o", label="generated")
        baselines = [(s, r["baseline"]) for s, r in rows if isinstance(r.get("baseline"), (int, float))]
        if baselines:
            ax.plot(*zip(*baselines), linestyle="--", color="grey", label="real vs real")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def grids_figure(grids, path) -> bool:
    import matplotlib.pyplot as plt
    from PIL import Image

    if not grids:
        return False
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.4), squeeze=False)
    for ax, (step, grid) in zip(axes[0], grids):
        with Image.open(grid) as im:
            ax.imshow(im.convert("L"), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"step {step}")
        ax.axis("off")
    save_figure(fig, path)
    return True


def copy_png(src, dst) -> bool:
    """Re-encode an image as PNG (checks it is one, and keeps nothing but the pixels)."""
    import numpy as np
    from PIL import Image

    from hpcgan.stacks import write_png

    try:
        with Image.open(src) as im:
            pixels = np.asarray(im.convert("RGB" if im.mode in ("RGB", "RGBA", "P") else "L"))
    except (OSError, ValueError):
        log.warning("%s: not a readable image; left out of the report", os.path.basename(src))
        return False
    write_png(pixels, dst)
    return True


def contact_sheet_figure(samples_dir, run_dir, path) -> bool:
    """The newest stack's contact sheet: from --samples (PNG, or drawn from the HDF5 stack), else
    the newest stack-*.png under RUN_DIR."""
    from hpcgan.stacks import contact_sheet, read_stack_h5, write_png

    if samples_dir:
        png = newest(glob.glob(os.path.join(samples_dir, "stack-*.png")))
        if png:
            return copy_png(png, path)
        h5 = newest(glob.glob(os.path.join(samples_dir, "stack-*.h5")))
        if h5:
            write_png(contact_sheet(read_stack_h5(h5), nrow=10), path)
            return True
        return False
    png = newest(glob.glob(os.path.join(run_dir, "**", "stack-*.png"), recursive=True))
    return bool(png) and copy_png(png, path)


def segmentation_section(evaluation) -> str:
    """Dice per class of the U-Nets trained on real, synthetic and real + synthetic pairs (hpcgan evaluate
    --task segmentation), on the real validation pairs."""
    task = ((evaluation or {}).get("metrics") or {}).get("segmentation")
    if not isinstance(task, dict) or not isinstance(task.get("arms"), dict):
        return "<p>Not evaluated (<code>hpcgan evaluate --task segmentation</code> on a joint image + mask model).</p>"
    classes = task.get("num_classes") or max((len(a.get("dice", [])) for a in task["arms"].values()), default=0)
    names = list(task.get("class_names") or []) or [f"class {k}" for k in range(classes)]
    header = ["U-Net trained on", "pairs", "mean foreground Dice", *(f"Dice {n}" for n in names[1:classes])]
    rows = [
        (
            html.escape(arm),
            int(result.get("train_pairs", 0)),
            number(result.get("mean_dice")),
            *(number(d) for d in list(result.get("dice", []))[1:classes]),
        )
        for arm, result in task["arms"].items()
    ]
    recipe = task.get("recipe") or {}
    return table(header, rows) + (
        f"<p>Dice on {int(task.get('val_pairs', 0))} real validation pairs; the real-only U-Net is the baseline. "
        f"Recipe: {html.escape(json.dumps(recipe, sort_keys=True))}.</p>"
    )


# ---------------------------------------------------------------- the page


def table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def number(v) -> str:
    return "-" if not isinstance(v, (int, float)) else html.escape(f"{v:.4g}")


def image(src, alt) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'


def evaluation_section(evaluation, evaluation_dir, figures_dir, href) -> str:
    from hpcgan.metrics import verdict

    if not evaluation or not isinstance(evaluation.get("metrics"), dict):
        return "<p>No evaluation (run <code>hpcgan evaluate --out RUN_DIR/evaluation.json</code>).</p>"
    results = evaluation["metrics"]
    rows = [
        (
            html.escape(n),
            number(r.get("value")),
            number(r.get("baseline")),
            html.escape(verdict(n, r)),
        )
        for n, r in results.items()
        if isinstance(r, dict)
    ]
    parts = [table(["metric", "value", "real-vs-real baseline", "verdict"], rows)]
    gen = evaluation.get("generated", {})
    parts.append(
        f"<p>{int(gen.get('count', 0))} generated images against {int(evaluation.get('real', {}).get('train', 0))}"
        f" training and {int(evaluation.get('real', {}).get('val', 0))} validation slices.</p>"
    )
    mem = results.get("memorization")
    parts.append("<h3>Memorisation audit</h3>")
    if not isinstance(mem, dict) or mem.get("value") is None:
        parts.append("<p>Not evaluated.</p>")
        return "\n".join(parts)
    parts.append(
        f"<p>{100 * mem['value']:.1f}% of generated images are closer to a training image than the 1st "
        f"percentile of validation images (threshold {mem['threshold']:.4g}; validation: "
        f"{100 * mem['baseline']:.1f}%). Verdict: <b>{html.escape(mem.get('verdict', ''))}</b>.</p>"
    )
    worst_dir = os.path.join(evaluation_dir, evaluation.get("worst_dir") or "worst-pairs")
    rows = []
    for row in mem.get("worst", []):
        name = os.path.basename(str(row.get("png", "")))
        shown = (
            name
            and os.path.isfile(os.path.join(worst_dir, name))
            and copy_png(os.path.join(worst_dir, name), os.path.join(figures_dir, name))
        )
        rows.append(
            (
                int(row["generated"]),
                int(row["train"]),
                number(row.get("distance")),
                number(row.get("ssim")),
                image(href(name), f"generated {row['generated']} | training {row['train']}") if shown else "-",
            )
        )
    parts.append(table(["generated", "nearest training", "distance", "SSIM", "generated | training"], rows))
    return "\n".join(parts)


def selected_section(selected, evals) -> str:
    """The selected checkpoint's realism metric and memorisation beside their baselines, and the guard."""
    if selected is None:
        return "<p>No evaluation during training, so no checkpoint was selected (set eval.every_steps).</p>"
    metric, guard = selected["metric"], selected["guard"]
    guard_text = f"memorization &lt;= {guard:g} (checkpoint.max_memorization)" if guard else "off"
    if selected["file"] is None:
        if guard and selected["checkpoints"]:
            why = f"no evaluated checkpoint passed the memorisation guard ({guard_text}): no checkpoints/best"
        else:
            why = "no evaluated checkpoint yet"
        return f"<p>Selected by {html.escape(metric)}; memorisation guard: {guard_text}. {why}.</p>"
    details = next((e["eval"] for e in evals if e["step"] == selected["step"]), {})

    def baseline(name):
        result = details.get(name)
        return number(result.get("baseline")) if isinstance(result, dict) else "-"

    rows = [
        (
            html.escape(selected["file"]),
            selected["step"],
            f"{number(selected['metrics'].get(metric))} (real vs real {baseline(metric)})",
            f"{number(selected['metrics'].get('memorization'))} (validation {baseline('memorization')})",
            guard_text,
        )
    ]
    return table(["checkpoints/best", "step", html.escape(metric), "memorization", "memorisation guard"], rows)


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
)


def run(args):
    from hpcgan.io import check_writable_dir, write_bytes_atomic

    run_dir = args.run_dir
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir}: no such run directory")
    if args.samples and not os.path.isdir(args.samples):
        raise UsageError(f"--samples {args.samples}: no such directory")
    if args.evaluation and not os.path.isfile(args.evaluation):
        raise UsageError(f"--evaluation {args.evaluation}: no such file")
    if args.turing_test and not os.path.isfile(args.turing_test):
        raise UsageError(f"--turing-test {args.turing_test}: no such file")
    out = args.out or os.path.join(run_dir, "report.html")
    out_dir = check_writable_dir(os.path.dirname(os.path.abspath(out)))
    figures_dir = check_writable_dir(os.path.join(run_dir, "report"))

    def href(name):
        return os.path.relpath(os.path.join(figures_dir, name), out_dir)

    import matplotlib

    from hpcgan import turing_test

    matplotlib.use("Agg")
    train, evals = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evaluation_path = args.evaluation or os.path.join(run_dir, "evaluation.json")
    evaluation = read_json(evaluation_path, "evaluation", required=False)
    env = read_json(os.path.join(run_dir, "env.json"), "environment", required=False) or {}
    config_path = os.path.join(run_dir, "config.yaml")
    config = open(config_path).read() if os.path.isfile(config_path) else None

    def figure(title, name, made, missing):
        body = image(href(name), title) if made else f"<p>{missing}</p>"
        return f"<h2>{title}</h2>\n{body}"

    last = train[-1] if train else {}
    sections = [
        f"<h1>Run {html.escape(os.path.basename(os.path.abspath(run_dir)))}</h1>",
        f"<p>{len(train)} training log lines, last step {last.get('step', '-')}; {len(evals)} evaluations.</p>",
        figure(
            "Losses",
            "losses.png",
            loss_figure(train, os.path.join(figures_dir, "losses.png")),
            "No training metrics yet (metrics.jsonl).",
        ),
        figure(
            "Evaluation metrics",
            "metrics.png",
            metric_figure(evals, os.path.join(figures_dir, "metrics.png")),
            "No evaluation during training (set eval.every_steps).",
        ),
        figure(
            "Sample grids over time",
            "grids.png",
            grids_figure(evenly_spaced(grid_steps(run_dir), MAX_GRIDS), os.path.join(figures_dir, "grids.png")),
            "No sample grids (samples/grid-*.png).",
        ),
        figure(
            "Last stack",
            "contact-sheet.png",
            contact_sheet_figure(args.samples, run_dir, os.path.join(figures_dir, "contact-sheet.png")),
            "No sample stack (run hpcgan sample, or pass --samples).",
        ),
        "<h2>Selected checkpoint</h2>",
        selected_section(selected_checkpoint(run_dir), evals),
        "<h2>Evaluation</h2>",
        evaluation_section(evaluation, os.path.dirname(os.path.abspath(evaluation_path)), figures_dir, href),
        "<h2>Task: segmentation (train on synthetic, test on real)</h2>",
        segmentation_section(evaluation),
        "<h2>Visual Turing test</h2>",
        turing_test.report_section(
            read_json(
                args.turing_test or os.path.join(run_dir, "turing-test.json"), "Turing-test scores", required=False
            )
        ),
        "<h2>Config</h2>",
        f"<pre>{html.escape(config)}</pre>" if config is not None else "<p>No config.yaml.</p>",
        "<h2>Environment</h2>",
        table(
            ["key", "value"],
            [
                (html.escape(str(k)), html.escape(json.dumps(v) if not isinstance(v, str) else v))
                for k, v in sorted(env.items())
            ],
        )
        if env
        else "<p>No env.json.</p>",
    ]
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>hpcgan report</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    write_bytes_atomic(out, page.encode())
    log.info("wrote %s (figures in %s)", out, figures_dir)
    return 0
