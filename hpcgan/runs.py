"""Reading a run directory that `hpcgan train` wrote (its layout: hpcgan/training/run_directory.py): metrics.jsonl,
env.json, the sample grids and provenance of sample stacks, and an evaluation.json from `hpcgan evaluate`. The run's
config.yaml and its selected checkpoint are read by hpcgan.training.checkpointing (read_run_config, run_selection),
which `select_checkpoint` follows.
The run may be unfinished or killed: a missing file reads as nothing and a torn last log line is skipped.
Used by `hpcgan report` and `hpcgan sweep-summary`.

A metric's *result* is (value, where: the step or "evaluation.json", the memorisation of the same evaluation
or None)."""

import glob
import json
import os
import re

from hpcgan.io import read_json, read_jsonl
from hpcgan.stacks import read_stack_attrs
from hpcgan.training.run_directory import RUN_FILE


def read_metrics(path) -> tuple:
    """(training lines, evaluation lines) of metrics.jsonl; a torn last line (a killed run) and
    unreadable lines are skipped with a warning (hpcgan.io.read_jsonl)."""
    train, evals = [], []
    for entry in read_jsonl(path):
        if isinstance(entry.get("step"), (int, float)):
            (evals if isinstance(entry.get("eval"), dict) else train).append(entry)
    return train, evals


def metric_value(result) -> float | None:
    """The value of one metric's result dict (or of a bare number), None when there is no number."""
    value = result.get("value") if isinstance(result, dict) else result
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def last_evaluation(path, metric) -> tuple | None:
    """The result of the metric's last evaluation line in metrics.jsonl, or None."""
    found = None
    for entry in read_metrics(path)[1]:
        value = metric_value(entry["eval"].get(metric))
        if value is not None:
            found = (value, entry["step"], metric_value(entry["eval"].get("memorization")))
    return found


def read_json_object(path) -> dict:
    """A JSON object a command wrote (an evaluation.json: metrics, generated with its checkpoint_sha256, split;
    a sample index.json), as a dict; {} when it is missing, not readable or not an object: a run may lack it."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def evaluation_result(evaluation: dict, metric) -> tuple | None:
    """The metric's result in an evaluation.json read by read_json_object, or None ({}: no file or not
    readable; not measured)."""
    results = evaluation.get("metrics")
    if not isinstance(results, dict):
        return None
    value = metric_value(results.get(metric))
    return (value, "evaluation.json", metric_value(results.get("memorization"))) if value is not None else None


def config_text(run_dir) -> str | None:
    """The run's config.yaml as written, or None."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def samples_provenance(samples_dir) -> dict:
    """{"checkpoint_sha256", "step"} of the stacks `hpcgan sample` wrote to a directory: from its index.json, else
    from a stack-*.h5's attributes; {} when neither records them (or there are no stacks)."""
    index = read_json_object(os.path.join(samples_dir, "index.json"))
    if not index.get("checkpoint_sha256"):
        stacks = sorted(glob.glob(os.path.join(samples_dir, "stack-*.h5")))
        try:
            index = read_stack_attrs(stacks[0]) if stacks else {}
        except (OSError, KeyError):
            index = {}
    step = index.get("step")
    return {
        "checkpoint_sha256": str(index["checkpoint_sha256"]) if index.get("checkpoint_sha256") else None,
        "step": int(step) if step is not None else None,
    }


def run_title(run_dir) -> str:
    """The run's folder name, config and dataset (run.json), e.g. "run: wgan-gp-64 (6 overrides) on dataset
    tissue-64 (t1, 64x64; train: 1 subject, 48 slices; val: 1 subject, 48 slices)"; only the folder's name for a
    run without run.json (one trained before it was written)."""
    title = os.path.basename(os.path.abspath(run_dir))
    source = read_json_object(os.path.join(run_dir, RUN_FILE))
    if not source.get("config"):
        return title
    overrides = len(source.get("overrides") or [])
    title += f": {source['config']}" + (f" ({plural(overrides, 'override')})" if overrides else "")
    dataset = source.get("dataset") or {}
    if dataset.get("name"):
        shape = "x".join(str(n) for n in (dataset.get("image_shape") or [])[1:])
        what = [", ".join(dataset.get("modalities") or []), shape]
        if dataset.get("mask_classes"):
            what.append(f"{dataset['mask_classes']}-class masks")
        splits = [
            f"{split}: {plural(entry.get('subjects'), 'subject')}, {plural(entry.get('slices'), 'slice')}"
            for split, entry in (dataset.get("splits") or {}).items()
        ]
        title += f" on dataset {dataset['name']} ({', '.join(w for w in what if w)}; {'; '.join(splits)})"
    return title


def plural(count, noun) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def read_env(run_dir) -> dict:
    """env.json (versions, backend, world size, devices); {} when missing."""
    return read_json(os.path.join(run_dir, "env.json"), "environment", required=False) or {}


def grid_steps(run_dir) -> list:
    """[(step, path)] of samples/grid-<step>.png, in step order."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "samples", "grid-*.png")):
        match = re.fullmatch(r"grid-(\d+)\.png", os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def selected_result(selected: dict, metric) -> tuple | None:
    """The metric's result at the checkpoint a guarded run selected, or None when none passed the guard."""
    value = metric_value(selected["metrics"].get(metric)) if selected["file"] else None
    return None if value is None else (value, selected["step"], metric_value(selected["metrics"].get("memorization")))
