"""Write a self-contained HTML report of a training run: loss curves, metric curves, sample grids
over time, the selected (best) checkpoint with its memorisation guard, the last stack's contact sheet and the
checkpoint it came from (a warning when that is not the selected one), the evaluation with the split it was
scored on (test-split figures are the final ones), the memorisation audit with its worst pairs, the config and
the environment. One log line names the run's selected checkpoint and why (select_checkpoint).

  hpcgan report RUN_DIR                                   # → RUN_DIR/report.html
  hpcgan report RUN_DIR --samples SAMPLES_DIR --evaluation SAMPLES_DIR/evaluation.json

Reads RUN_DIR/metrics.jsonl, config.yaml, env.json and samples/grid-*.png; the contact sheet comes
from --samples (its newest stack-*.png, else one drawn from its newest stack-*.h5) or the newest
stack-*.png under RUN_DIR; the evaluation from --evaluation or RUN_DIR/evaluation.json; the visual Turing
test's scores from --turing-test or RUN_DIR/turing-test.json (`hpcgan turing-test score`). Figures are
PNGs in RUN_DIR/report/, referenced by relative paths; missing parts are said so on the page."""

import os

from hpcgan.errors import UsageError
from hpcgan.io import check_writable_dir, write_bytes_atomic
from hpcgan.log import get_logger
from hpcgan.report.sections import report_page
from hpcgan.training.checkpointing import CHECKPOINTS_DIR, select_checkpoint

log = get_logger("report")


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


def check_inputs(args):
    """Every path given must be there: a UsageError naming the first that is not."""
    if not os.path.isdir(args.run_dir):
        raise UsageError(f"{args.run_dir}: no such run directory")
    if args.samples and not os.path.isdir(args.samples):
        raise UsageError(f"--samples {args.samples}: no such directory")
    if args.evaluation and not os.path.isfile(args.evaluation):
        raise UsageError(f"--evaluation {args.evaluation}: no such file")
    if args.turing_test and not os.path.isfile(args.turing_test):
        raise UsageError(f"--turing-test {args.turing_test}: no such file")


def log_selection(run_dir):
    """One line: the checkpoint the run selected (what sample/evaluate --checkpoint RUN_DIR use) and why, or why
    there is none; nothing for a run without checkpoints."""
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINTS_DIR)):
        return
    try:
        path, reason = select_checkpoint(run_dir)
    except UsageError as exc:
        log.warning("%s", exc)
        return
    log.info("%s: %s", path, reason)


def run(args):
    check_inputs(args)
    log_selection(args.run_dir)
    run_dir = args.run_dir
    out = args.out or os.path.join(run_dir, "report.html")
    out_dir = check_writable_dir(os.path.dirname(os.path.abspath(out)))
    figures_dir = check_writable_dir(os.path.join(run_dir, "report"))

    def href(name):
        return os.path.relpath(os.path.join(figures_dir, name), out_dir)

    page = report_page(
        run_dir,
        figures_dir,
        href,
        samples_dir=args.samples,
        evaluation_path=args.evaluation or os.path.join(run_dir, "evaluation.json"),
        turing_test_path=args.turing_test or os.path.join(run_dir, "turing-test.json"),
    )
    write_bytes_atomic(out, page.encode())
    log.info("wrote %s (figures in %s)", out, figures_dir)
    return 0
