"""The scores of a session's answers, per reader and pooled, with Fleiss' kappa between readers: as JSON,
as CSV for a spreadsheet (every reading, and the per-reader statistics), as a table for the terminal and as
the Visual Turing test section of `hpcgan report`."""

import html

from hpcgan.io import write_csv_atomic
from hpcgan.pages import number, table
from hpcgan.turing.session import LABELS
from hpcgan.turing.stats import fleiss_kappa, reading_stats

SCORES_FORMAT = "hpcgan-turing-scores"
CHANCE = 0.5


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


READINGS_HEADER = ("reader", "position", "image", "truth", "answer", "correct", "confidence")
READER_STATS = ("n", "correct", "accuracy", "ci95_low", "ci95_high", "p_value", "sensitivity", "specificity")


def csv_paths(json_path) -> tuple:
    """(readings CSV, readers CSV) beside the scores JSON: X.json → X.readings.csv, X.readers.csv."""
    stem = str(json_path)[: -len(".json")] if str(json_path).endswith(".json") else str(json_path)
    return f"{stem}.readings.csv", f"{stem}.readers.csv"


def write_scores_csv(json_path, key: dict, answers: dict, scores: dict) -> tuple:
    """The CSV tables beside the scores JSON, each written atomically; returns their paths.
    readings: one row per answer (reader, its position in the reader's order, image, truth, answer,
    correct 0/1, confidence), the data a statistician refits (e.g. a mixed model by reader and image).
    readers: one row per reader and a last "pooled" row, with the statistics of the JSON, accuracy by
    confidence level and Fleiss' kappa of all readers (the same on every row)."""
    readings_path, readers_path = csv_paths(json_path)
    truth = key["truth"]
    write_csv_atomic(
        readings_path,
        READINGS_HEADER,
        [
            (reader, position, image, truth[image], answer, int(truth[image] == answer), confidence)
            for reader, rows in sorted(answers.items())
            for position, (image, answer, confidence) in enumerate(rows, start=1)
        ],
    )
    levels = list(scores["pooled"]["by_confidence"])
    kappa = (scores.get("fleiss_kappa") or {}).get("value")
    header = ["reader", *READER_STATS, "complete", *(f"accuracy_confidence_{level}" for level in levels)]
    rows = []
    for name, stats in [*scores["readers"].items(), ("pooled", scores["pooled"])]:
        values = {**stats, "ci95_low": stats["ci95"][0], "ci95_high": stats["ci95"][1]}
        by_level = stats["by_confidence"]
        rows.append(
            [
                name,
                *(values[column] for column in READER_STATS),
                None if name == "pooled" else int(stats["complete"]),
                *((by_level.get(level) or {}).get("accuracy") for level in levels),
                kappa,
            ]
        )
    write_csv_atomic(readers_path, [*header, "fleiss_kappa"], rows)
    return readings_path, readers_path


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


def report_section(scores) -> str:
    """HTML for `hpcgan report`: the scores table, kappa and accuracy by confidence."""
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
