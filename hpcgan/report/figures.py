"""The report's figures, each written as a PNG (atomically) and reporting whether there was anything to draw.
matplotlib and PIL are imported when a figure is drawn: importing this module stays light."""

import glob
import os

import numpy as np

from hpcgan.io import atomic_path
from hpcgan.log import get_logger
from hpcgan.stacks import contact_sheet, read_stack_h5, write_png

log = get_logger("report")


def pyplot():
    """matplotlib.pyplot drawing off-screen (a batch node has no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)


def loss_figure(train, path) -> bool:
    plt = pyplot()
    keys = sorted({k for e in train for k, v in e.items() if k.startswith("loss") and isinstance(v, (int, float))})
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in keys:
        points = [(e["step"], e[key]) for e in train if isinstance(e.get(key), (int, float))]
        ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def metric_figure(evals, path) -> bool:
    """One panel per metric: its value over the steps, the real-vs-real baseline dashed."""
    plt = pyplot()
    names = sorted(
        {
            n
            for e in evals
            for n, r in e["eval"].items()
            if isinstance(r, dict) and isinstance(r.get("value"), (int, float))
        }
    )
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [
            (e["step"], e["eval"][name])
            for e in evals
            if isinstance(e["eval"].get(name), dict) and isinstance(e["eval"][name].get("value"), (int, float))
        ]
        ax.plot([s for s, _ in rows], [r["value"] for _, r in rows], marker="o", label="generated")
        baselines = [(s, r["baseline"]) for s, r in rows if isinstance(r.get("baseline"), (int, float))]
        if baselines:
            ax.plot(*zip(*baselines), linestyle="--", color="grey", label="real vs real")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def evenly_spaced(items: list, k: int) -> list:
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def grids_figure(grids, path) -> bool:
    """grids: [(step, path of its sample grid)], one panel each."""
    from PIL import Image

    plt = pyplot()
    if not grids:
        return False
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.4), squeeze=False)
    for ax, (step, grid) in zip(axes[0], grids):
        with Image.open(grid) as im:
            ax.imshow(im.convert("L"), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"step {step}")
        ax.axis("off")
    save_figure(fig, path)
    return True


def copy_png(src, dst) -> bool:
    """Re-encode an image as PNG (checks it is one, and keeps nothing but the pixels)."""
    from PIL import Image

    try:
        with Image.open(src) as im:
            pixels = np.asarray(im.convert("RGB" if im.mode in ("RGB", "RGBA", "P") else "L"))
    except (OSError, ValueError):
        log.warning("%s: not a readable image; left out of the report", os.path.basename(src))
        return False
    write_png(pixels, dst)
    return True


def newest(paths):
    return max(paths, key=lambda p: (os.path.getmtime(p), p)) if paths else None


def shown_samples_dir(samples_dir, run_dir):
    """The sample directory whose stack the report shows: --samples, else that of the newest stack-*.png under
    RUN_DIR (None when there is none)."""
    if samples_dir:
        return samples_dir
    png = newest(glob.glob(os.path.join(run_dir, "**", "stack-*.png"), recursive=True))
    return os.path.dirname(png) if png else None


def contact_sheet_figure(samples_dir, run_dir, path) -> bool:
    """The newest stack's contact sheet: from --samples (PNG, or drawn from the HDF5 stack), else
    the newest stack-*.png under RUN_DIR."""
    if samples_dir:
        png = newest(glob.glob(os.path.join(samples_dir, "stack-*.png")))
        if png:
            return copy_png(png, path)
        h5 = newest(glob.glob(os.path.join(samples_dir, "stack-*.h5")))
        if h5:
            write_png(contact_sheet(read_stack_h5(h5), nrow=10), path)
            return True
        return False
    png = newest(glob.glob(os.path.join(run_dir, "**", "stack-*.png"), recursive=True))
    return bool(png) and copy_png(png, path)
