"""Evaluation metrics for generated image sets, each beside its real-versus-real baseline.

`METRICS` maps a name to a `Metric` (its module's `compute`, which direction is better and a
line saying what it measures); `evaluate` runs several on one process or split across the
ranks of a group (hpcgan.parallel.group; every rank returns the same dict). Images are (N, C, H, W)
float32 in [-1, 1], background -1. No metric downloads anything."""

import importlib
from dataclasses import dataclass

import numpy as np

from hpcgan.errors import UsageError
from hpcgan.parallel.group import ONE_PROCESS


@dataclass(frozen=True)
class Metric:
    module: str
    higher_is_better: bool
    description: str
    reading: str  # what the figure says, in plain words, for a reader new to the field (report, demo)

    def compute(self, fake, train, val, **kwargs) -> dict:
        return importlib.import_module(self.module).compute(fake, train, val, **kwargs)


METRICS = {
    "swd": Metric(
        "hpcgan.metrics.swd",
        False,
        "sliced Wasserstein distance of Laplacian-pyramid patches, x1e3",
        "realism: how far the images' local structure (edges, textures, at several scales) is from real slices'",
    ),
    "msssim": Metric(
        "hpcgan.metrics.msssim",
        False,
        "mean MS-SSIM of random pairs (diversity; high = collapse)",
        "diversity: how alike random pairs of images are; far above the baseline, the model draws one image "
        "again and again (mode collapse)",
    ),
    "intensity": Metric(
        "hpcgan.metrics.intensity",
        False,
        "W1 distance of foreground intensity histograms",
        "brightness: how far the histogram of tissue intensities is from the real one",
    ),
    "memorization": Metric(
        "hpcgan.metrics.memorization",
        False,
        "fraction of images nearer a training image than 99% of validation images",
        "copying: the share of images nearer a training slice than 99% of real unseen slices are; far above the "
        "baseline, the model hands out copies of its training patients",
    ),
    "fid": Metric(
        "hpcgan.metrics.fid",
        False,
        "Frechet distance of Inception features (offline weights only)",
        "realism as an ImageNet network's features see it (from weights in a file you name)",
    ),
}
DEFAULT_METRICS = ("swd", "msssim", "intensity", "memorization")
# Rows `hpcgan evaluate` adds for a joint image + mask model, beside METRICS: name → higher is better.
# masks: hpcgan.metrics.masks; segmentation: hpcgan.segmentation (--task segmentation, mean Dice).
MASK_ROWS = {"masks": False, "segmentation": True}


def higher_is_better(name: str) -> bool:
    """Whether a larger value of evaluation row `name` (a metric or a mask row) is better."""
    return METRICS[name].higher_is_better if name in METRICS else MASK_ROWS[name]


def check_metric_names(names, key: str, error: type[Exception] = UsageError) -> tuple:
    """The one check of metric names (CLI flags, config keys, library calls): tuple(names), or
    `error` with "KEY: unknown metric 'x' (known: ...)". ValueError suits dataclass __post_init__,
    which hpcgan.config turns into a UsageError naming the config file."""
    names = tuple(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise error(f"{key}: unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    if not names:
        raise error(f"{key}: no metric given (known: {', '.join(METRICS)})")
    return names


def parse_metrics(text: str) -> tuple:
    """'swd,fid' → ('swd', 'fid'); UsageError naming an unknown metric."""
    return check_metric_names((n.strip() for n in text.split(",") if n.strip()), "--metrics")


def check_shapes(fake, train, val):
    """Every set is (N, C, H, W) with the same C, H, W."""
    for name, images in (("generated", fake), ("train", train), ("val", val)):
        if images is not None and np.ndim(images) != 4:
            raise UsageError(f"{name} images: expected (N, C, H, W), got shape {np.shape(images)}")
    for name, images in (("generated", fake), ("val", val)):
        if images is not None and len(images) and tuple(images.shape[1:]) != tuple(train.shape[1:]):
            raise UsageError(
                f"{name} images are {tuple(images.shape[1:])} but the training images are "
                f"{tuple(train.shape[1:])} (C, H, W)"
            )


def evaluate(
    fake, train, val, metrics=DEFAULT_METRICS, group=ONE_PROCESS, seed=0, worst_dir=None, fid_weights=None
) -> dict:
    """metric name → {"value": float | None, "baseline": float | None, ...details}. The baseline is
    real versus real: validation against training images (msssim: the training images' own pairs).
    Every rank of `group` must call this with the same arguments and gets the same result."""
    fake, train = np.asarray(fake, np.float32), np.asarray(train, np.float32)
    val = None if val is None else np.asarray(val, np.float32)
    check_shapes(fake, train, val)
    results = {}
    for name in check_metric_names(metrics, "metrics"):
        results[name] = METRICS[name].compute(
            fake, train, val, group=group, seed=seed, worst_dir=worst_dir, fid_weights=fid_weights
        )
        results[name]["higher_is_better"] = METRICS[name].higher_is_better
    return results


def verdict(name: str, result: dict) -> str:
    """One word or phrase for a table: the metric's own verdict if it gives one, else how the value
    compares with the real-versus-real baseline."""
    if result.get("verdict"):
        return result["verdict"]
    if result.get("value") is None:
        return "unavailable"
    ratio = baseline_ratio(name, result)
    if ratio is None:
        return "no baseline"
    return "like real data" if ratio <= 1.5 else f"{ratio:.1f}x worse than real"


def baseline_ratio(name: str, result: dict) -> float | None:
    """How many times worse than its real-vs-real baseline a result is (above 1 worse, whichever direction is
    better); None without a value or a positive baseline."""
    value, baseline = result.get("value"), result.get("baseline")
    if value is None or baseline is None or baseline <= 0:
        return None
    ratio = value / baseline
    if result.get("higher_is_better", name in METRICS and METRICS[name].higher_is_better):
        ratio = 1 / ratio if ratio > 0 else float("inf")
    return ratio


def format_table(results: dict) -> str:
    """metric | value | real-vs-real baseline | verdict, one row per metric, plus notes."""

    def number(v):
        return "-" if v is None else f"{v:.4g}"

    rows = [("metric", "value", "real-vs-real baseline", "verdict")]
    rows += [(name, number(r.get("value")), number(r.get("baseline")), verdict(name, r)) for name, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{name}: {r['note']}" for name, r in results.items() if r.get("note")]
    return "\n".join(lines)
