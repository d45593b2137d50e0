"""Hyper-parameter sweeps: grid point I as `--set` overrides (for a Slurm job array), and a
ranking of finished runs by an evaluation metric.

  hpcgan sweep --grid "lr=1e-4,2e-4,1e-3 beta1=0.5,0.9 beta2=0.9,0.99,0.999 latent=50,100,500,1000" --count
  hpcgan train --config wgan-gp-64 --data DATA --out runs/$(hpcgan sweep --grid "$GRID" --index $I --name) \\
      $(hpcgan sweep --grid "$GRID" --index $I)
  hpcgan sweep-summary runs/sweep/* --metric swd --csv runs/sweep/summary.csv

A grid is space-separated KEY=V1,V2,... ; points are numbered in row-major order (the last key
changes fastest). Short keys: lr, beta1, beta2, latent, batch, loss (see SHORT_KEYS); a dotted
config key (optim.lr_d) passes through unchanged. --index defaults to $SLURM_ARRAY_TASK_ID."""

import os
import re

import yaml

from hpcgan.config import load_config
from hpcgan.errors import UsageError

SHORT_KEYS = {
    "lr": "optim.lr",
    "beta1": "optim.beta1",
    "beta2": "optim.beta2",
    "latent": "model.latent_dim",
    "batch": "train.batch_size",
    "loss": "loss.type",
}


def add_arguments(parser):
    parser.add_argument("--grid", required=True, help='space-separated KEY=V1,V2,... e.g. "lr=1e-4,2e-4 beta1=0.5,0.9"')
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--count", action="store_true", help="print the number of grid points")
    what.add_argument(
        "--name", action="store_true", help="print a run name for grid point --index, e.g. lr1e-4_beta10.5"
    )
    parser.add_argument(
        "--index", type=int, default=None, metavar="I", help="grid point, 0 to count-1 (default: $SLURM_ARRAY_TASK_ID)"
    )


def parse_grid(text: str) -> list:
    """'lr=1e-4,2e-4 beta1=0.5' → [('lr', ['1e-4', '2e-4']), ('beta1', ['0.5'])]; UsageError if malformed."""
    axes = []
    for item in text.split():
        key, sep, values = item.partition("=")
        raw = [v for v in values.split(",")]
        if not sep or not key or not values or any(not v for v in raw):
            raise UsageError(f"--grid: '{item}' is not KEY=V1,V2,...")
        if "." not in key and key not in SHORT_KEYS:
            raise UsageError(
                f"--grid: unknown short key '{key}' (known: {', '.join(SHORT_KEYS)}; "
                "or give a dotted config key such as optim.lr)"
            )
        if key in (k for k, _ in axes):
            raise UsageError(f"--grid: key '{key}' appears twice")
        axes.append((key, raw))
    if not axes:
        raise UsageError("--grid: empty grid")
    return axes


def grid_size(axes) -> int:
    size = 1
    for _, values in axes:
        size *= len(values)
    return size


def grid_point(axes, index: int) -> list:
    """[(key, raw value)] of point `index`, row-major (last key fastest)."""
    size = grid_size(axes)
    if not 0 <= index < size:
        raise UsageError(f"--index {index}: out of range for a grid of {size} points (0 to {size - 1})")
    point = []
    for key, values in reversed(axes):
        index, i = divmod(index, len(values))
        point.append((key, values[i]))
    return point[::-1]


def config_value(raw: str) -> str:
    """The value as the config will read it (YAML), written back canonically: 1e-4 → 0.0001."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", raw):
        value = float(raw)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return raw
    return repr(value)


def overrides(point) -> list:
    return [f"{SHORT_KEYS.get(key, key)}={config_value(raw)}" for key, raw in point]


def run_name(point) -> str:
    """lr1e-4_beta10.5_...: the keys and values as written, safe as a directory name."""
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", f"{key}{raw}") for key, raw in point)


def check_overrides(sets: list):
    """Every key and value must be one the training config accepts (UsageError naming it)."""
    # Here, not at the top: the training config loads torch (through the model registry), and
    # `sweep --count`, which Slurm array scripts call, needs none of it.
    from hpcgan.training.config import Config

    try:
        load_config(Config, None, sets)
    except UsageError as exc:
        raise UsageError(f"--grid: {str(exc).removeprefix('config: ')}") from None


def run(args):
    axes = parse_grid(args.grid)
    if args.count:
        print(grid_size(axes))
        return 0
    index = args.index
    if index is None:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task is None or not task.isdigit():
            raise UsageError("--index: required (or run inside a Slurm job array)")
        index = int(task)
    point = grid_point(axes, index)
    if args.name:
        print(run_name(point))
        return 0
    sets = overrides(point)
    check_overrides(sets)
    print(" ".join(f"--set {s}" for s in sets))
    return 0
