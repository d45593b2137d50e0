"""Rank finished runs of a sweep by an evaluation metric: a table, and a CSV with --csv.

  hpcgan sweep-summary runs/sweep/* --metric swd --csv runs/sweep/summary.csv

A run's value is the last evaluation of the metric in RUN_DIR/metrics.jsonl (written during
training), else the one in RUN_DIR/evaluation.json (`hpcgan evaluate --out`); a run trained with the
memorisation guard (checkpoint.max_memorization) gives its selected checkpoint's (checkpoints/best), or no
result when no checkpoint passed the guard. A "memorization" column shows the memorisation of the same
evaluation when some run measured it, and a "guard" column the guard when some run had it. Best first (lower is
better for every metric but those marked otherwise); runs without a value come last as
"no result". The columns after the value are the config keys whose values differ between the
runs (from each RUN_DIR/config.yaml): the swept hyper-parameters."""

import csv
import io
import json
import os

from hpcgan.errors import UsageError
from hpcgan.io import write_bytes_atomic
from hpcgan.metrics import MASK_ROWS, check_metric_names, higher_is_better
from hpcgan.runs import evaluation_result, last_evaluation, read_config, selected_checkpoint, selected_result

NO_RESULT = "no result"


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by hpcgan train")
    parser.add_argument(
        "--metric",
        default="swd",
        help="evaluation metric to rank by, or segmentation (Dice of hpcgan evaluate --task segmentation; "
        "masks: mask plausibility) (default swd)",
    )
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV (atomically)")


def flatten(tree, prefix="") -> dict:
    """{"optim": {"lr": 1e-4}} → {"optim.lr": 1e-4}; None → {}."""
    out = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def summarise(run_dirs, metric) -> tuple:
    """(header, rows): rank, run, metric, step, swept keys...; best first, no result last."""
    runs = []
    for run_dir in run_dirs:
        selected = selected_checkpoint(run_dir)
        guard = selected["guard"] if selected else None
        if guard:
            found = selected_result(selected, metric)
        else:
            found = last_evaluation(os.path.join(run_dir, "metrics.jsonl"), metric) or evaluation_result(
                os.path.join(run_dir, "evaluation.json"), metric
            )
        runs.append(
            {
                "run": os.path.basename(os.path.normpath(run_dir)),
                "result": found,
                "config": flatten(read_config(run_dir)),
                "guard": guard,
            }
        )
    configs = [r["config"] for r in runs if r["config"]]  # a run without config.yaml does not make every key "swept"
    keys = sorted({k for c in configs for k in c})
    swept = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    sign = -1.0 if higher_is_better(metric) else 1.0
    done = sorted((r for r in runs if r["result"]), key=lambda r: sign * r["result"][0])  # stable: ties keep order
    any_guard = any(r["guard"] for r in runs)
    show_memorization = metric != "memorization" and (
        any_guard or any(r["result"] and r["result"][2] is not None for r in runs)
    )
    header = [
        "rank",
        "run",
        metric,
        "step",
        *(["memorization"] if show_memorization else []),
        *(["guard"] if any_guard else []),
        *swept,
    ]
    rows = []
    for i, r in enumerate(done + [r for r in runs if not r["result"]]):
        value, step, memorization = r["result"] or (NO_RESULT, "", None)
        rank = str(i + 1) if r["result"] else "-"
        guard = f"<= {r['guard']:g}" + ("" if r["result"] else " (none passed)") if r["guard"] else "off"
        rows.append(
            [
                rank,
                r["run"],
                value if isinstance(value, str) else f"{value:.6g}",
                "" if step is None else str(step),
                *([f"{memorization:.4g}" if memorization is not None else "-"] if show_memorization else []),
                *([guard] if any_guard else []),
                *[str(r["config"].get(k, "")) for k in swept],
            ]
        )
    return header, rows


def format_rows(header, rows) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])


def run(args):
    if args.metric not in MASK_ROWS:  # segmentation: Dice of hpcgan evaluate --task segmentation, highest first
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
