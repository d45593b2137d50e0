"""Reading a run directory that `hpcgan train` wrote (its layout: hpcgan/training/run_directory.py): metrics.jsonl,
config.yaml, env.json, the sample grids, the selected checkpoint, and an evaluation.json from `hpcgan evaluate`.
The run may be unfinished or killed: a missing file reads as nothing and a torn last log line is skipped.
Used by `hpcgan report` and `hpcgan sweep-summary`.

A metric's *result* is (value, where: the step or "evaluation.json", the memorisation of the same evaluation
or None)."""

import glob
import json
import os
import re

import yaml

from hpcgan.io import read_json, read_jsonl
from hpcgan.training.checkpointing import CHECKPOINTS_DIR, read_index, read_pointer


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


def evaluation_result(path, metric) -> tuple | None:
    """The metric's result in an evaluation.json, or None (no file, not readable, not measured)."""
    try:
        with open(path) as f:
            results = json.load(f)["metrics"]
        value = metric_value(results[metric])
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return (value, "evaluation.json", metric_value(results.get("memorization"))) if value is not None else None


def read_config(run_dir) -> dict | None:
    """The run's config.yaml as a dict, or None (missing, unreadable, not a mapping)."""
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def config_text(run_dir) -> str | None:
    """The run's config.yaml as written, or None."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


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


def selected_checkpoint(run_dir) -> dict | None:
    """The checkpoint a run selected (checkpoints/best) and what it was selected by: {"metric":
    checkpoint.best_metric, "guard": checkpoint.max_memorization or None, "checkpoints": how many are indexed,
    "file", "step", "metrics"} (file and step None when none is best, e.g. none passed the memorisation guard).
    None for a run without evaluation during training (nothing to select by)."""
    config = read_config(run_dir)
    if config is None or not (config.get("eval") or {}).get("every_steps"):
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


def selected_result(selected: dict, metric) -> tuple | None:
    """The metric's result at the checkpoint a guarded run selected, or None when none passed the guard."""
    value = metric_value(selected["metrics"].get(metric)) if selected["file"] else None
    return None if value is None else (value, selected["step"], metric_value(selected["metrics"].get("memorization")))
