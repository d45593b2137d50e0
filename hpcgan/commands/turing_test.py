"""A visual Turing test: clinicians tell real slices from generated ones, blinded, and the answers are scored.

  hpcgan turing-test make --data DATASET --samples SAMPLES_DIR --out SESSION_DIR --num 100 --seed 1 --readers 4
  hpcgan turing-test make --data DATASET --checkpoint RUN_DIR --out SESSION_DIR     (the run's selected checkpoint)
  (each reader opens SESSION_DIR/index.html in a browser, answers, exports answers-R1-….json)
  hpcgan turing-test score SESSION_DIR answers-*.json --out RUN_DIR/turing-test.json
  hpcgan report RUN_DIR            (shows RUN_DIR/turing-test.json as a section)

`make` draws --num images: real slices of the dataset's --split (validation by default) and generated
slices, --fake-fraction of them, chosen by --seed: from the stack-*.h5 files of `hpcgan sample`, or with
--checkpoint the first images of the run's image set (hpcgan.generation, as evaluate --checkpoint), from the
checkpoint the run selected (checkpoints/best, honouring the memorisation guard; RUN/checkpoints/latest for
the newest).
Both kinds go through the same rendering: [-1, 1] → uint8 as preprocessing encodes, first channel in
grey (RGB for 3 channels), uncompressed PNG without metadata, so every image file has the same size.
The session folder holds index.html (offline, self-contained: no server, no network) and images/ with
random file names, all with the same modification time; each reader gets an own random order. The
session holds no subject id, slice index or path. The answer key (which image is real) is written
apart, to SESSION_DIR.key.json beside the folder (or --key), so the folder can be handed to readers.

`score` checks each answer file against the key (same session, known images), and reports per reader and
pooled: accuracy, sensitivity and specificity for "synthetic", an exact two-sided binomial test against
chance (1/2) with a 95% Clopper-Pearson interval, accuracy by confidence level, and Fleiss' kappa
between readers (on the images every reader answered); also as CSV beside the JSON (every reading, and
the per-reader scores). Pooled readings of the same images are not
independent: read the pooled p-value as descriptive, the per-reader ones as the tests."""

import argparse
import os

import numpy as np

from hpcgan.commands import CHECKPOINT_HELP, common_flags
from hpcgan.data import read_slices
from hpcgan.generation import checkpoint_images
from hpcgan.preprocess.manifest import load_manifest
from hpcgan.errors import UsageError
from hpcgan.io import check_writable_dir, write_json_atomic
from hpcgan.log import get_logger
from hpcgan.stacks import read_samples
from hpcgan.training.checkpointing import select_checkpoint
from hpcgan.turing.scores import score_answers, scores_table, write_scores_csv
from hpcgan.turing.session import (
    KEY_FORMAT,
    default_key_path,
    draw_session,
    read_answers,
    read_key,
    read_session_page,
    write_session,
)

log = get_logger("turing_test")


def add_arguments(parser):
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(parser))
    common = common_flags(top=False)
    make = actions.add_parser(
        "make",
        parents=[common],
        help="write a reading session and its answer key",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    make.add_argument("--data", required=True, metavar="DATASET_DIR", help="written by `hpcgan preprocess`")
    synthetic = make.add_mutually_exclusive_group(required=True)
    synthetic.add_argument("--samples", metavar="SAMPLES_DIR", help="stack-*.h5 written by `hpcgan sample`")
    synthetic.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="generate the images instead, from " + CHECKPOINT_HELP,
    )
    make.add_argument("--out", required=True, metavar="SESSION_DIR", help="the session folder (new or empty)")
    make.add_argument("--num", type=int, default=100, metavar="N", help="images in the session (default 100)")
    make.add_argument(
        "--fake-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="fraction of generated images, rounded to whole images (default 0.5)",
    )
    make.add_argument("--seed", type=int, default=0, help="chooses the real and generated images (default 0)")
    make.add_argument(
        "--readers", type=int, default=1, metavar="R", help="readers R1..RR, each with an own random order (default 1)"
    )
    make.add_argument("--split", default="val", help="dataset split of the real images (default val)")
    make.add_argument("--key", metavar="JSON", help="answer key (default: SESSION_DIR.key.json beside the folder)")
    make.set_defaults(_action=make_session)
    score = actions.add_parser(
        "score",
        parents=[common],
        help="score exported answers against the key",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("session_dir", metavar="SESSION_DIR", help="written by `hpcgan turing-test make`")
    score.add_argument("answers", nargs="+", metavar="ANSWERS_JSON", help="files exported by the readers' pages")
    score.add_argument("--key", metavar="JSON", help="answer key (default: SESSION_DIR.key.json)")
    score.add_argument(
        "--out",
        metavar="JSON",
        help="scores as JSON, written atomically (default: SESSION_DIR.scores.json), with the readings and "
        "the per-reader scores as CSV beside it (X.readings.csv, X.readers.csv)",
    )
    score.set_defaults(_action=score_session)


def run(args):
    return args._action(args)


# ---------------------------------------------------------------- make


def check_make_args(args) -> tuple:
    """(real count, synthetic count, key path) or a UsageError."""
    if args.num < 2:
        raise UsageError(f"--num: must be >= 2, got {args.num}")
    if not 0.0 < args.fake_fraction < 1.0:
        raise UsageError(f"--fake-fraction: must be between 0 and 1 (exclusive), got {args.fake_fraction}")
    if args.readers < 1:
        raise UsageError(f"--readers: must be >= 1, got {args.readers}")
    num_fake = round(args.num * args.fake_fraction)
    num_real = args.num - num_fake
    if min(num_fake, num_real) < 1:
        raise UsageError(
            f"--num {args.num} --fake-fraction {args.fake_fraction}: needs at least one image of each kind"
        )
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"{args.out}: exists and is not an empty folder; a session is written once, into a new folder")
    key = args.key or default_key_path(args.out)
    if os.path.exists(key):
        raise UsageError(f"{key}: an answer key is already there; choose another --out or --key")
    return num_real, num_fake, key


def read_generated(args, num_real: int, num_fake: int) -> tuple:
    """(generated images, their provenance), checked against the dataset: enough real and generated
    images, of one shape."""
    manifest = load_manifest(args.data)
    if args.split not in manifest["splits"]:
        raise UsageError(f"{args.data}: no split {args.split!r} (have: {', '.join(manifest['splits'])})")
    available = int(manifest["splits"][args.split].get("slices", 0))
    if available < num_real:
        raise UsageError(
            f"{args.data}: the {args.split} split has {available} slices; --num {args.num} with "
            f"--fake-fraction {args.fake_fraction} needs {num_real} real images"
        )
    if args.checkpoint:
        path, reason = select_checkpoint(args.checkpoint)
        generated, _, provenance = checkpoint_images(path, num_fake, manifest["image_shape"][0])
        log.info("%s: %s", path, reason)
    else:
        generated, provenance = read_samples(args.samples)
    source = args.samples or args.checkpoint
    if len(generated) < num_fake:
        raise UsageError(
            f"{source}: {len(generated)} generated images; --num {args.num} with "
            f"--fake-fraction {args.fake_fraction} needs {num_fake}"
        )
    if tuple(generated.shape[1:]) != tuple(manifest["image_shape"]):
        raise UsageError(
            f"{source}: generated images are {list(generated.shape[1:])}, the dataset's are "
            f"{list(manifest['image_shape'])} (C, H, W); sample from a model trained on this dataset"
        )
    return generated, provenance


def make_session(args):
    num_real, num_fake, key_path = check_make_args(args)
    generated, provenance = read_generated(args, num_real, num_fake)
    check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    check_writable_dir(os.path.dirname(os.path.abspath(key_path)))

    rng = np.random.default_rng(args.seed)
    real = read_slices(args.data, args.split, max_items=num_real, seed=args.seed)
    fake = generated[np.sort(rng.choice(len(generated), size=num_fake, replace=False))]
    truths = ["real"] * num_real + ["synthetic"] * num_fake
    session_data, truth_of, picture_of = draw_session(np.concatenate([real, fake]), truths, args.readers)
    key = {
        "format": KEY_FORMAT,
        "version": 1,
        "session": session_data["session"],
        "truth": dict(sorted(truth_of.items())),
        "num": args.num,
        "num_real": num_real,
        "num_synthetic": num_fake,
        "fake_fraction": args.fake_fraction,
        "seed": args.seed,
        "split": args.split,
        "readers": [r["id"] for r in session_data["readers"]],
        "synthetic_source": {k: v for k, v in provenance.items() if k in ("checkpoint_sha256", "step")},
    }
    write_session(args.out, session_data, picture_of, key, key_path)
    log.info(
        "wrote a session of %d images (%d real, %d synthetic) for %d reader(s); answer key: %s",
        args.num,
        num_real,
        num_fake,
        args.readers,
        key_path,
    )
    return 0


# ---------------------------------------------------------------- score


def score_session(args):
    session_dir = os.path.normpath(args.session_dir)
    session = read_session_page(session_dir)
    key = read_key(session_dir, args.key, session["session"])
    answers = {}
    for path in args.answers:
        reader, rows = read_answers(path, key)
        if reader in answers:
            raise UsageError(f"{path}: a second answer file of reader {reader}")
        answers[reader] = rows
    for reader, rows in answers.items():
        if len(rows) < len(key["truth"]):
            log.warning("reader %s answered %d of %d images", reader, len(rows), len(key["truth"]))
    scores = score_answers(key, answers)
    out = args.out or session_dir + ".scores.json"
    write_json_atomic(out, scores)
    tables = write_scores_csv(out, key, answers, scores)
    print(scores_table(scores))
    log.info("wrote %s (and as CSV: %s)", out, ", ".join(tables))
    return 0
