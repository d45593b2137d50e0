"""The report page, section by section. A section shows its part of the run, or says what is missing and
which command makes it."""

import html
import json
import os

from hpcgan.io import read_json
from hpcgan.metrics import METRICS, verdict
from hpcgan.pages import image, number, page, table
from hpcgan.report.figures import (
    contact_sheet_figure,
    copy_png,
    evenly_spaced,
    grids_figure,
    loss_figure,
    metric_figure,
    shown_samples_dir,
)
from hpcgan.runs import config_text, grid_steps, read_env, read_metrics, run_title, samples_provenance
from hpcgan.training.checkpointing import run_selection, selection_reason
from hpcgan.turing.scores import report_section as turing_test_section

MAX_GRIDS = 6


def figure_section(title, src, made, missing) -> str:
    body = image(src, title) if made else f"<p>{missing}</p>"
    return f"<h2>{title}</h2>\n{body}"


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
    return (
        table(["checkpoints/best", "step", html.escape(metric), "memorization", "memorisation guard"], rows)
        + f"<p>Selected: {html.escape(selection_reason(selected))}.</p>"
    )


def provenance_note(what: str, provenance: dict, selected) -> str:
    """Which checkpoint `what` (shown samples, the evaluation) came from; a warning when it is not the one the
    run selected (checkpoints/best, which honours the memorisation guard)."""
    sha, step = provenance.get("checkpoint_sha256"), provenance.get("step")
    if not sha:
        return f"<p>{what}: the checkpoint they came from is not recorded.</p>"
    came = f"{what} came from the checkpoint of step {step} (sha256 {html.escape(str(sha)[:12])})"
    if selected is None:
        return f"<p>{came}; the run selected no checkpoint (no evaluation during training).</p>"
    if selected["file"] is not None and sha == selected["sha256"]:
        return f"<p>{came}: the run's selected checkpoint (checkpoints/best).</p>"
    chosen = f"step {selected['step']}" if selected["file"] else "none: no checkpoint passed the memorisation guard"
    return (
        f"<p><b>Warning:</b> {came}, not the checkpoint the run selected (checkpoints/best: {chosen}). "
        "Generate them again from the run directory (<code>hpcgan sample --checkpoint RUN_DIR</code>), which "
        "uses the selected checkpoint.</p>"
    )


def memorization_audit(mem, worst_dir, figures_dir, href) -> list:
    """The audit's verdict and its worst pairs, each pair's PNG copied beside the page."""
    parts = [
        f"<p>{100 * mem['value']:.1f}% of generated images are closer to a training image than the 1st "
        f"percentile of validation images (threshold {mem['threshold']:.4g}; validation: "
        f"{100 * mem['baseline']:.1f}%). Verdict: <b>{html.escape(mem.get('verdict', ''))}</b>.</p>"
    ]
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
    return parts


def split_note(evaluation) -> str:
    """Whether the evaluation's figures are the final ones: scored on the test split (never read by training,
    its evaluation or the memorisation guard), or selection figures on the validation split."""
    if evaluation.get("split") == "test":
        return (
            "<p><b>Final figures</b>: scored on the test split, which training, its evaluation and the memorisation "
            "guard never read.</p>"
        )
    return (
        "<p>Selection figures: scored on the validation split, the one the checkpoint was selected on (optimistic "
        "by construction). The final figures come from <code>hpcgan evaluate --split test</code> on a dataset "
        "preprocessed with <code>--test-fraction</code>.</p>"
    )


def evaluation_section(evaluation, evaluation_dir, figures_dir, href) -> str:
    """The metrics of `hpcgan evaluate` beside their baselines, which split scored them, and the memorisation
    audit."""
    if not evaluation or not isinstance(evaluation.get("metrics"), dict):
        return "<p>No evaluation (run <code>hpcgan evaluate --out RUN_DIR/evaluation.json</code>).</p>"
    results = evaluation["metrics"]
    split = evaluation.get("split", "val")
    rows = [
        (
            html.escape(n),
            number(r.get("value")),
            number(r.get("baseline")),
            html.escape(verdict(n, r)),
            html.escape(METRICS[n].reading if n in METRICS else ""),
        )
        for n, r in results.items()
        if isinstance(r, dict)
    ]
    header = ["metric", "value", "real-vs-real baseline", "verdict", "what it says"]
    parts = [split_note(evaluation), table(header, rows)]
    gen, real = evaluation.get("generated", {}), evaluation.get("real", {})
    held_out = "test" if split == "test" else "validation"
    parts.append(
        f"<p>{int(gen.get('count', 0))} generated images against {int(real.get('train', 0))} training and "
        f"{int(real.get(split, 0))} {held_out} slices.</p>"
    )
    mem = results.get("memorization")
    parts.append("<h3>Memorisation audit</h3>")
    if not isinstance(mem, dict) or mem.get("value") is None:
        parts.append("<p>Not evaluated.</p>")
        return "\n".join(parts)
    worst_dir = os.path.join(evaluation_dir, evaluation.get("worst_dir") or "worst-pairs")
    parts.extend(memorization_audit(mem, worst_dir, figures_dir, href))
    return "\n".join(parts)


def segmentation_section(evaluation) -> str:
    """Dice per class of the U-Nets trained on real, synthetic and real + synthetic pairs (hpcgan evaluate
    --task segmentation), on the real held-out pairs of its --split."""
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
    held_out = "test" if evaluation.get("split") == "test" else "validation"
    return table(header, rows) + (
        f"<p>Dice on {int(task.get('val_pairs', 0))} real {held_out} pairs; the real-only U-Net is the baseline. "
        f"Recipe: {html.escape(json.dumps(recipe, sort_keys=True))}.</p>"
    )


def config_section(config) -> str:
    return f"<pre>{html.escape(config)}</pre>" if config is not None else "<p>No config.yaml.</p>"


def environment_section(env) -> str:
    if not env:
        return "<p>No env.json.</p>"
    rows = [
        (html.escape(str(k)), html.escape(json.dumps(v) if not isinstance(v, str) else v))
        for k, v in sorted(env.items())
    ]
    return table(["key", "value"], rows)


def report_page(run_dir, figures_dir, href, samples_dir, evaluation_path, turing_test_path) -> str:
    """The whole page; its figures are written to figures_dir, `href(name)` is how the page links one."""
    train, evals = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evaluation = read_json(evaluation_path, "evaluation", required=False)
    env = read_env(run_dir)
    config = config_text(run_dir)

    def figure(title, name, made, missing):
        return figure_section(title, href(name), made, missing)

    last = train[-1] if train else {}
    selected = run_selection(run_dir)
    shown = shown_samples_dir(samples_dir, run_dir)
    title = run_title(run_dir)
    sections = [
        f"<h1>Run {html.escape(title)}</h1>",
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
            contact_sheet_figure(samples_dir, run_dir, os.path.join(figures_dir, "contact-sheet.png")),
            "No sample stack (run hpcgan sample, or pass --samples).",
        ),
        provenance_note("These samples", samples_provenance(shown), selected) if shown else "",
        "<h2>Selected checkpoint</h2>",
        selected_section(selected, evals),
        "<h2>Evaluation</h2>",
        provenance_note("The evaluated images", (evaluation or {}).get("generated") or {}, selected)
        if evaluation
        else "",
        evaluation_section(evaluation, os.path.dirname(os.path.abspath(evaluation_path)), figures_dir, href),
        "<h2>Task: segmentation (train on synthetic, test on real)</h2>",
        segmentation_section(evaluation),
        "<h2>Visual Turing test</h2>",
        turing_test_section(read_json(turing_test_path, "Turing-test scores", required=False)),
        "<h2>Config</h2>",
        config_section(config),
        "<h2>Environment</h2>",
        environment_section(env),
    ]
    return page(f"hpcgan report: {title}", sections)
