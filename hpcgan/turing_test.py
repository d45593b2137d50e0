"""A visual Turing test: clinicians tell real slices from generated ones, blinded, and the answers are scored.

  hpcgan turing-test make --data DATASET --samples SAMPLES_DIR --out SESSION_DIR --num 100 --seed 1 --readers 4
  (each reader opens SESSION_DIR/index.html in a browser, answers, exports answers-R1-….json)
  hpcgan turing-test score SESSION_DIR answers-*.json --out RUN_DIR/turing-test.json
  hpcgan report RUN_DIR            (shows RUN_DIR/turing-test.json as a section)

`make` draws --num images: real slices of the dataset's --split (validation by default) and generated
slices from the stack-*.h5 files of `hpcgan sample`, --fake-fraction of them generated, chosen by --seed.
Both kinds go through the same rendering: [-1, 1] → uint8 as preprocessing encodes, first channel in
grey (RGB for 3 channels), uncompressed PNG without metadata, so every image file has the same size.
The session folder holds index.html (offline, self-contained: no server, no network) and images/ with
random file names, all with the same modification time; each reader gets an own random order. The
session holds no subject id, slice index or path. The answer key (which image is real) is written
apart, to SESSION_DIR.key.json beside the folder (or --key), so the folder can be handed to readers.

`score` checks each answer file against the key (same session, known images), and reports per reader and
pooled: accuracy, sensitivity and specificity for "synthetic", an exact two-sided binomial test against
chance (1/2) with a 95% Clopper-Pearson interval, accuracy by confidence level, and Fleiss' kappa
between readers (on the images every reader answered). Pooled readings of the same images are not
independent: read the pooled p-value as descriptive, the per-reader ones as the tests."""

import argparse
import html
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from fractions import Fraction
from importlib import resources

import numpy as np

from hpcgan.errors import UsageError
from hpcgan.io import read_json
from hpcgan.log import get_logger

log = get_logger("turing_test")

SESSION_FORMAT = "hpcgan-turing-session"
KEY_FORMAT = "hpcgan-turing-key"
ANSWERS_FORMAT = "hpcgan-turing-answers"
SCORES_FORMAT = "hpcgan-turing-scores"
LABELS = ("real", "synthetic")
CONFIDENCE_LEVELS = 5
CHANCE = 0.5
IMAGES_DIR = "images"
PAGE = "index.html"


def add_arguments(parser):
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(parser))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    make = actions.add_parser(
        "make",
        parents=[common],
        help="write a reading session and its answer key",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    make.add_argument("--data", required=True, metavar="DATASET_DIR", help="written by `hpcgan preprocess`")
    make.add_argument("--samples", required=True, metavar="SAMPLES_DIR", help="stack-*.h5 written by `hpcgan sample`")
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
        "--out", metavar="JSON", help="scores as JSON, written atomically (default: SESSION_DIR.scores.json)"
    )
    score.set_defaults(_action=score_session)


def run(args):
    return args._action(args)


def default_key_path(session_dir) -> str:
    return os.path.normpath(os.fspath(session_dir)) + ".key.json"


# ---------------------------------------------------------------- statistics (pure)


def binomial_test(successes: int, trials: int) -> float:
    """Exact two-sided binomial test against 1/2: the probability of an outcome no more likely than the
    one observed (as scipy.stats.binomtest). In integers, so it is exact for any n."""
    if trials == 0:
        return 1.0
    observed = math.comb(trials, successes)
    tail = sum(c for c in (math.comb(trials, k) for k in range(trials + 1)) if c <= observed)
    return min(1.0, float(Fraction(tail, 2**trials)))


def _binomial_tail(successes: int, trials: int, p: float, upper: bool) -> float:
    """P(X >= successes) if upper, else P(X <= successes), X ~ Binomial(trials, p), 0 < p < 1."""
    ks = range(successes, trials + 1) if upper else range(0, successes + 1)
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(trials + 1)
    return sum(
        math.exp(base - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p + (trials - k) * log_q) for k in ks
    )


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple:
    """Exact (Clopper-Pearson) interval of a binomial proportion, by bisection on the binomial tails."""
    if trials == 0:
        return 0.0, 1.0
    alpha = (1.0 - confidence) / 2.0

    def solve(upper_tail: bool) -> float:
        lo, hi = 0.0, 1.0  # P(X >= k) rises with p; P(X <= k) falls
        for _ in range(80):
            mid = (lo + hi) / 2.0
            tail = _binomial_tail(successes, trials, mid, upper_tail)
            if (tail < alpha) == upper_tail:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2.0

    lower = 0.0 if successes == 0 else solve(True)
    upper = 1.0 if successes == trials else solve(False)
    return lower, upper


def fleiss_kappa(counts) -> float | None:
    """Fleiss' kappa of an (items, categories) table of how many raters put each item in each category
    (the same number of raters per item); None when chance agreement is total (one category only)."""
    counts = np.asarray(counts, dtype=np.float64)
    items, raters = counts.shape[0], counts[0].sum()
    if items == 0 or raters < 2:
        return None
    agreement = ((counts**2).sum(axis=1) - raters) / (raters * (raters - 1))
    shares = counts.sum(axis=0) / (items * raters)
    chance = float((shares**2).sum())
    if chance >= 1.0:
        return None
    return float((agreement.mean() - chance) / (1.0 - chance))


def reading_stats(readings) -> dict:
    """readings: [(truth, answer, confidence)] → accuracy, its exact test and interval, sensitivity and
    specificity for "synthetic", and accuracy by confidence level."""
    n = len(readings)
    correct = sum(truth == answer for truth, answer, _ in readings)
    synthetic = [answer for truth, answer, _ in readings if truth == "synthetic"]
    real = [answer for truth, answer, _ in readings if truth == "real"]
    lower, upper = clopper_pearson(correct, n)
    by_confidence = {}
    for level in sorted({c for _, _, c in readings if c is not None}):
        at_level = [truth == answer for truth, answer, c in readings if c == level]
        by_confidence[str(level)] = {
            "n": len(at_level),
            "correct": sum(at_level),
            "accuracy": sum(at_level) / len(at_level),
        }
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "ci95": [lower, upper],
        "p_value": binomial_test(correct, n),
        "sensitivity": synthetic.count("synthetic") / len(synthetic) if synthetic else None,
        "specificity": real.count("real") / len(real) if real else None,
        "by_confidence": by_confidence,
    }


# ---------------------------------------------------------------- make


def render_slices(images) -> list:
    """(N, C, H, W) in [-1, 1] → N uint8 pictures: grey (H, W) from the first channel, or RGB for three
    channels. Real and generated images go through this one function."""
    from hpcgan.stacks import to_uint8

    pixels = to_uint8(images)
    pixels = pixels if pixels.shape[-1] == 3 else pixels[..., 0]
    return list(pixels)


def page_html(session_data: dict) -> str:
    template = resources.files("hpcgan").joinpath("turing_test.html").read_text(encoding="utf-8")
    data = json.dumps(session_data, sort_keys=True).replace("</", "<\\/")  # stays inside its <script>
    return template.replace("{{SESSION_DATA}}", data)


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


def make_session(args):
    from hpcgan.data import load_manifest, read_slices
    from hpcgan.evaluate import read_samples
    from hpcgan.io import check_writable_dir, write_bytes_atomic, write_json_atomic
    from hpcgan.stacks import write_png

    num_real, num_fake, key_path = check_make_args(args)
    manifest = load_manifest(args.data)
    if args.split not in manifest["splits"]:
        raise UsageError(f"{args.data}: no split {args.split!r} (have: {', '.join(manifest['splits'])})")
    available = int(manifest["splits"][args.split].get("slices", 0))
    if available < num_real:
        raise UsageError(
            f"{args.data}: the {args.split} split has {available} slices; --num {args.num} with "
            f"--fake-fraction {args.fake_fraction} needs {num_real} real images"
        )
    generated, provenance = read_samples(args.samples)
    if len(generated) < num_fake:
        raise UsageError(
            f"{args.samples}: {len(generated)} generated images; --num {args.num} with "
            f"--fake-fraction {args.fake_fraction} needs {num_fake}"
        )
    if tuple(generated.shape[1:]) != tuple(manifest["image_shape"]):
        raise UsageError(
            f"{args.samples}: generated images are {list(generated.shape[1:])}, the dataset's are "
            f"{list(manifest['image_shape'])} (C, H, W); sample from a model trained on this dataset"
        )
    parent = check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    check_writable_dir(os.path.dirname(os.path.abspath(key_path)))

    rng = np.random.default_rng(args.seed)
    real = read_slices(args.data, args.split, max_items=num_real, seed=args.seed)
    fake = generated[np.sort(rng.choice(len(generated), size=num_fake, replace=False))]
    pictures = render_slices(np.concatenate([real, fake]))
    truths = ["real"] * num_real + ["synthetic"] * num_fake

    # Names, order and session id come from the system's randomness, not from --seed: nothing a reader
    # could recompute. Files are written in name order and get one modification time, so neither the
    # directory order, the inode numbers nor the times follow the truth.
    secure = random.SystemRandom()
    names = set()
    while len(names) < len(pictures):
        names.add(f"{secure.getrandbits(64):016x}.png")
    names = sorted(names)
    secure.shuffle(names)
    truth_of = dict(zip(names, truths))
    picture_of = dict(zip(names, pictures))
    session_id = f"{secure.getrandbits(128):032x}"
    readers = []
    for r in range(args.readers):
        order = sorted(names)
        secure.shuffle(order)
        readers.append({"id": f"R{r + 1}", "order": order})
    session_data = {
        "format": SESSION_FORMAT,
        "version": 1,
        "session": session_id,
        "confidence_levels": CONFIDENCE_LEVELS,
        "readers": readers,
    }
    key = {
        "format": KEY_FORMAT,
        "version": 1,
        "session": session_id,
        "truth": dict(sorted(truth_of.items())),
        "num": args.num,
        "num_real": num_real,
        "num_synthetic": num_fake,
        "fake_fraction": args.fake_fraction,
        "seed": args.seed,
        "split": args.split,
        "readers": [r["id"] for r in readers],
        "synthetic_source": {k: v for k, v in provenance.items() if k in ("checkpoint_sha256", "step")},
    }

    out = os.path.abspath(args.out)
    key_inside = os.path.commonpath([os.path.abspath(key_path), out]) == out
    key_written = False
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        os.makedirs(os.path.join(staging, IMAGES_DIR))
        for name in sorted(names):
            write_png(picture_of[name], os.path.join(staging, IMAGES_DIR, name), compress_level=0)
        write_bytes_atomic(os.path.join(staging, PAGE), page_html(session_data).encode())
        if key_inside:
            inside = os.path.join(staging, os.path.relpath(os.path.abspath(key_path), out))
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            write_json_atomic(inside, key)
        else:
            write_json_atomic(key_path, key)
            key_written = True
        stamp = int(time.time())
        for folder, _, files in os.walk(staging):
            for name in [*files, "."]:
                os.utime(os.path.join(folder, name), (stamp, stamp))
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; readers on a shared folder must open it
        os.rename(staging, out)  # onto a missing or empty folder: atomic
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if key_written:
            os.remove(key_path)  # a key without its session is no use
        raise
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


def read_session_json(path, what: str, file_format: str, body: str, body_type: type, session_id: str) -> dict:
    """A JSON file of this session (`what`: "answer key" or "answer file"): its format, its `body`
    entry and its session id checked."""
    data = read_json(path, what)
    if not isinstance(data, dict) or data.get("format") != file_format or not isinstance(data.get(body), body_type):
        raise UsageError(f"{path}: not an {what} of hpcgan turing-test")
    if data.get("session") != session_id:
        raise UsageError(
            f"{path}: an {what} of another session ({str(data.get('session'))[:8]}), not of this one ({session_id[:8]})"
        )
    return data


def read_session_page(session_dir) -> dict:
    """The session data embedded in SESSION_DIR/index.html."""
    path = os.path.join(session_dir, PAGE)
    if not os.path.isfile(path):
        raise UsageError(f"{session_dir}: not a Turing-test session (no {PAGE})")
    with open(path, encoding="utf-8") as f:
        match = re.search(r'<script id="session-data" type="application/json">(.*?)</script>', f.read(), re.S)
    try:
        data = json.loads(match.group(1)) if match else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
        raise UsageError(f"{path}: no session data in the page (not written by hpcgan turing-test make)")
    return data


def read_answers(path, key: dict) -> tuple:
    """(reader id, [(image, answer, confidence)]) of one exported answer file, checked against the key."""
    data = read_session_json(path, "answer file", ANSWERS_FORMAT, "answers", list, key["session"])
    reader = data.get("reader")
    if not isinstance(reader, str) or not reader:
        raise UsageError(f"{path}: no reader id")
    rows, seen = [], set()
    for number, entry in enumerate(data["answers"], start=1):
        image = entry.get("image") if isinstance(entry, dict) else None
        answer = entry.get("answer") if isinstance(entry, dict) else None
        confidence = entry.get("confidence") if isinstance(entry, dict) else None
        if not isinstance(image, str) or image not in key["truth"]:
            raise UsageError(f"{path}: answer {number} is for an image that is not in this session")
        if image in seen:
            raise UsageError(f"{path}: answer {number} repeats image {image}")
        if answer not in LABELS:
            raise UsageError(f"{path}: answer {number} is {answer!r}, not one of {', '.join(LABELS)}")
        if confidence is not None and (
            not isinstance(confidence, int) or isinstance(confidence, bool) or not 1 <= confidence <= CONFIDENCE_LEVELS
        ):
            raise UsageError(f"{path}: answer {number} has confidence {confidence!r}, not 1 to {CONFIDENCE_LEVELS}")
        seen.add(image)
        rows.append((image, answer, confidence))
    if not rows:
        raise UsageError(f"{path}: no answers")
    return reader, rows


def score_answers(key: dict, answers: dict) -> dict:
    """answers: {reader: [(image, answer, confidence)]} → the scores (JSON-ready)."""
    truth = key["truth"]
    readers = {
        reader: reading_stats([(truth[image], answer, confidence) for image, answer, confidence in rows])
        for reader, rows in sorted(answers.items())
    }
    for stats in readers.values():
        stats["complete"] = stats["n"] == len(truth)
    pooled = reading_stats(
        [(truth[image], answer, confidence) for rows in answers.values() for image, answer, confidence in rows]
    )
    kappa = None
    if len(answers) >= 2:
        by_reader = [{image: answer for image, answer, _ in rows} for rows in answers.values()]
        common = sorted(set.intersection(*(set(a) for a in by_reader)))
        counts = [[sum(a[image] == label for a in by_reader) for label in LABELS] for image in common]
        kappa = {"value": fleiss_kappa(counts) if common else None, "images": len(common), "readers": len(by_reader)}
    return {
        "format": SCORES_FORMAT,
        "version": 1,
        "session": key["session"],
        "chance": CHANCE,
        "images": len(truth),
        "num_real": key.get("num_real"),
        "num_synthetic": key.get("num_synthetic"),
        "readers": readers,
        "pooled": pooled,
        "fleiss_kappa": kappa,
    }


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def scores_table(scores: dict) -> str:
    """The scores as plain-text tables for a terminal."""
    header = f"{'reader':<8} {'n':>5} {'accuracy':>8} {'95% CI':>15} {'p (vs 1/2)':>11} {'sens':>6} {'spec':>6}"
    lines = [
        f"Visual Turing test, session {scores['session'][:8]}: {scores['images']} images "
        f"({scores['num_real']} real, {scores['num_synthetic']} synthetic); sensitivity and specificity "
        'for "synthetic"',
        header,
    ]
    for name, stats in [*scores["readers"].items(), ("pooled", scores["pooled"])]:
        lo, hi = stats["ci95"]
        lines.append(
            f"{name:<8} {stats['n']:>5} {_fmt(stats['accuracy']):>8} {f'[{lo:.3f}, {hi:.3f}]':>15} "
            f"{stats['p_value']:>11.3g} {_fmt(stats['sensitivity'], '.2f'):>6} {_fmt(stats['specificity'], '.2f'):>6}"
        )
    kappa = scores["fleiss_kappa"]
    if kappa:
        lines.append(
            f"Fleiss' kappa between {kappa['readers']} readers on {kappa['images']} images: {_fmt(kappa['value'])}"
        )
    lines.append(
        "accuracy by confidence (pooled): "
        + ", ".join(
            f"{level}: {stats['accuracy']:.2f} (n={stats['n']})"
            for level, stats in scores["pooled"]["by_confidence"].items()
        )
    )
    return "\n".join(lines)


def score_session(args):
    from hpcgan.io import write_json_atomic

    session_dir = os.path.normpath(args.session_dir)
    session = read_session_page(session_dir)
    key = read_session_json(
        args.key or default_key_path(session_dir), "answer key", KEY_FORMAT, "truth", dict, session["session"]
    )
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
    print(scores_table(scores))
    log.info("wrote %s", out)
    return 0


# ---------------------------------------------------------------- report section


def report_section(scores) -> str:
    """HTML for `hpcgan report`: the scores table, kappa and accuracy by confidence."""
    from hpcgan.report import number, table

    if not isinstance(scores, dict) or scores.get("format") != SCORES_FORMAT:
        return (
            "<p>No visual Turing test (run <code>hpcgan turing-test score SESSION_DIR answers*.json "
            "--out RUN_DIR/turing-test.json</code>).</p>"
        )
    rows = []
    for name, stats in [*scores["readers"].items(), ("pooled", scores["pooled"])]:
        lo, hi = stats["ci95"]
        rows.append(
            (
                html.escape(name),
                int(stats["n"]),
                number(stats["accuracy"]),
                f"{lo:.3f} – {hi:.3f}",
                number(stats["p_value"]),
                number(stats["sensitivity"]),
                number(stats["specificity"]),
            )
        )
    parts = [
        f"<p>{int(scores['images'])} images ({scores.get('num_real')} real, {scores.get('num_synthetic')} "
        'synthetic); chance is 0.5. Sensitivity and specificity are for the answer "synthetic".</p>',
        table(
            [
                "reader",
                "n",
                "accuracy",
                "95% CI (Clopper-Pearson)",
                "p (two-sided binomial)",
                "sensitivity",
                "specificity",
            ],
            rows,
        ),
    ]
    kappa = scores.get("fleiss_kappa")
    if kappa:
        parts.append(
            f"<p>Fleiss' kappa between {int(kappa['readers'])} readers on {int(kappa['images'])} images: "
            f"{number(kappa['value'])}.</p>"
        )
    parts.append(
        table(
            ["confidence", "n", "accuracy (pooled)"],
            [
                (html.escape(level), int(s["n"]), number(s["accuracy"]))
                for level, s in scores["pooled"]["by_confidence"].items()
            ],
        )
    )
    return "\n".join(parts)
