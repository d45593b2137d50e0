"""Rank finished runs of a sweep by an evaluation metric: a table, and a CSV with --csv.

  hpcgan sweep-summary runs/sweep/* --metric swd --csv runs/sweep/summary.csv
  hpcgan sweep-summary runs/sweep/* --metric segmentation      # Dice of evaluate --task segmentation

A run's value, the first of:
  1. RUN_DIR/evaluation.json (`hpcgan evaluate --out`) when it holds the metric and scored the checkpoint the run
     selected (its generated checkpoint_sha256 is checkpoints/best's; for a run that selected none because it did
     not evaluate during training, any evaluation.json): the final score, with the split it was scored on;
  2. the run's evaluation during training at its selected checkpoint (checkpoints/best, from the index): a run
     whose evaluations no checkpoint passed the memorisation guard (checkpoint.max_memorization) has no result;
  3. for a run that did not evaluate during training, the last evaluation of the metric in metrics.jsonl.
So any metric evaluation.json holds ranks, the segmentation task's Dice included, for guarded runs too. A
"memorization" column shows the memorisation of the same evaluation when some run measured it, a "guard"
column the guard's verdict when some run had one (passed at step N, none passed, off), and a "split" column
the held-out split of each evaluation.json result (val or test; training-time evaluations use val). Best first
(lower is better for every metric but those marked otherwise); runs without a value come last as "no result".
The columns after those are the config keys whose values differ between the runs (from each RUN_DIR/config.yaml):
the swept hyper-parameters."""

import json
import os

from hpcgan.errors import UsageError
from hpcgan.io import write_csv_atomic
from hpcgan.metrics import MASK_ROWS, check_metric_names, higher_is_better
from hpcgan.runs import evaluation_result, last_evaluation, read_json_object, selected_result
from hpcgan.training.checkpointing import read_run_config, run_selection

NO_RESULT = "no result"


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by hpcgan train")
    parser.add_argument(
        "--metric",
        default="swd",
        help="evaluation metric to rank by, or segmentation (Dice of hpcgan evaluate --task segmentation; "
        "masks: mask plausibility); RUN_DIR/evaluation.json of the selected checkpoint wins over the evaluations "
        "during training (default swd)",
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


def run_result(run_dir, metric) -> tuple:
    """(result or None, split or None, guard verdict or None) of one run, by the rule of the module docstring."""
    selection = run_selection(run_dir)
    guard = None
    if selection and selection["guard"]:
        passed = f"passed at step {selection['step']}" if selection["file"] else "(none passed)"
        guard = f"<= {selection['guard']:g} {passed}"
    evaluation = read_json_object(os.path.join(run_dir, "evaluation.json"))
    scored = (evaluation.get("generated") or {}).get("checkpoint_sha256")
    if selection is None or (selection["file"] and scored == selection["sha256"]):
        found = evaluation_result(evaluation, metric)
        if found:
            return found, evaluation.get("split", "val"), guard
    if selection is not None:
        return selected_result(selection, metric), None, guard
    return last_evaluation(os.path.join(run_dir, "metrics.jsonl"), metric), None, guard


def summarise(run_dirs, metric) -> tuple:
    """(header, rows): rank, run, metric, step, [memorization, guard, split,] swept keys...; best first, no
    result last."""
    runs = []
    for run_dir in run_dirs:
        found, split, guard = run_result(run_dir, metric)
        runs.append(
            {
                "run": os.path.basename(os.path.normpath(run_dir)),
                "result": found,
                "split": split,
                "config": flatten(read_run_config(run_dir)),
                "guard": guard,
            }
        )
    configs = [r["config"] for r in runs if r["config"]]  # a run without config.yaml does not make every key "swept"
    keys = sorted({k for c in configs for k in c})
    swept = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    sign = -1.0 if higher_is_better(metric) else 1.0
    done = sorted((r for r in runs if r["result"]), key=lambda r: sign * r["result"][0])  # stable: ties keep order
    any_guard = any(r["guard"] for r in runs)
    any_split = any(r["split"] for r in runs)
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
        *(["split"] if any_split else []),
        *swept,
    ]
    rows = []
    for i, r in enumerate(done + [r for r in runs if not r["result"]]):
        value, step, memorization = r["result"] or (NO_RESULT, "", None)
        rows.append(
            [
                str(i + 1) if r["result"] else "-",
                r["run"],
                value if isinstance(value, str) else f"{value:.6g}",
                "" if step is None else str(step),
                *([f"{memorization:.4g}" if memorization is not None else "-"] if show_memorization else []),
                *([r["guard"] or "off"] if any_guard else []),
                *([r["split"] or ("val" if r["result"] else "-")] if any_split else []),
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
        write_csv_atomic(args.csv, header, rows)
    return 0
