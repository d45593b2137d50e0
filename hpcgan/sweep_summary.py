"""Rank finished runs of a sweep by an evaluation metric: a table, and a CSV with --csv.

  hpcgan sweep-summary runs/sweep/* --metric swd --csv runs/sweep/summary.csv

A run's value is the last evaluation of the metric in RUN_DIR/metrics.jsonl (written during
training), else the one in RUN_DIR/evaluation.json (`hpcgan evaluate --out`). Best first (lower is
better for every metric but those marked otherwise); runs without a value come last as
"no result". The columns after the value are the config keys whose values differ between the
runs (from each RUN_DIR/config.yaml): the swept hyper-parameters."""

import csv
import io
import json
import os

import yaml

from hpcgan.errors import UsageError

NO_RESULT = "no result"


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by hpcgan train")
    parser.add_argument("--metric", default="swd", help="evaluation metric to rank by (default swd)")
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV (atomically)")


def last_from_metrics_jsonl(path, metric):
    """(value, step) of the metric's last evaluation line in metrics.jsonl, or None."""
    from hpcgan.report import read_metrics

    found = None
    for entry in read_metrics(path)[1]:
        result = entry["eval"].get(metric)
        value = result.get("value") if isinstance(result, dict) else result
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found = (float(value), entry["step"])
    return found


def from_evaluation_json(path, metric):
    try:
        with open(path) as f:
            value = json.load(f)["metrics"][metric]["value"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return (float(value), "evaluation.json") if isinstance(value, (int, float)) else None


def flatten(tree, prefix="") -> dict:
    out = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_config(run_dir) -> dict:
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return {}
    return flatten(data) if isinstance(data, dict) else {}


def summarise(run_dirs, metric) -> tuple:
    """(header, rows): rank, run, metric, step, swept keys...; best first, no result last."""
    from hpcgan.metrics import METRICS

    runs = []
    for run_dir in run_dirs:
        found = last_from_metrics_jsonl(os.path.join(run_dir, "metrics.jsonl"), metric) or from_evaluation_json(
            os.path.join(run_dir, "evaluation.json"), metric
        )
        runs.append(
            {"run": os.path.basename(os.path.normpath(run_dir)), "result": found, "config": read_config(run_dir)}
        )
    configs = [r["config"] for r in runs if r["config"]]  # a run without config.yaml does not make every key "swept"
    keys = sorted({k for c in configs for k in c})
    swept = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    sign = -1.0 if METRICS[metric].higher_is_better else 1.0
    done = sorted((r for r in runs if r["result"]), key=lambda r: sign * r["result"][0])  # stable: ties keep order
    header = ["rank", "run", metric, "step", *swept]
    rows = []
    for i, r in enumerate(done + [r for r in runs if not r["result"]]):
        value, step = r["result"] or (NO_RESULT, "")
        rank = str(i + 1) if r["result"] else "-"
        rows.append(
            [
                rank,
                r["run"],
                value if isinstance(value, str) else f"{value:.6g}",
                "" if step is None else str(step),
                *[str(r["config"].get(k, "")) for k in swept],
            ]
        )
    return header, rows


def format_rows(header, rows) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])


def run(args):
    from hpcgan.io import write_bytes_atomic
    from hpcgan.metrics import check_metric_names

    check_metric_names([args.metric], "--metric")
    missing = [d for d in args.runs if not os.path.isdir(d)]
    if len(missing) == len(args.runs):
        raise UsageError(f"{missing[0]}: no such run directory")
    header, rows = summarise(args.runs, args.metric)
    print(format_rows(header, rows))
    if args.csv:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([header, *rows])
        write_bytes_atomic(args.csv, text.getvalue().encode())
    return 0
