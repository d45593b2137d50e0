"""Checkpoint files: the format, the index and pointers of a checkpoints/ directory, validation, finding
and loading. A checkpoint loads with `torch.load(path, map_location="cpu", weights_only=True)`, so a checkpoint
from someone else cannot run code; every failure to read one is a one-line UsageError naming the file."""

import json
from pathlib import Path

import torch

from hpcgan.errors import UsageError
from hpcgan.io import sha256_file
from hpcgan.log import get_logger

log = get_logger("checkpoint")

CHECKPOINT_FORMAT = "hpcgan-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
INDEX_NAME = "checkpoints.json"
CHECKPOINTS_DIR = "checkpoints"


# Text files in checkpoints/ naming one checkpoint file: the newest, and the one checkpoint.best_metric chose.
POINTERS = ("latest", "best")


def read_pointer(path) -> str | None:
    """The checkpoint file name a `latest` or `best` pointer holds, or None when there is no such file."""
    try:
        with open(path) as f:
            return f.read(1024).strip()
    except OSError:
        return None


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def read_index(directory) -> list:
    """The entries of `checkpoints.json`, oldest first; [] when there is none or it is unreadable."""
    path = Path(directory) / INDEX_NAME
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "file" in e for e in entries):
            raise ValueError("not a list of entries")
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable checkpoint index (%s); ignoring it", path, exc)
        return []
    return sorted(entries, key=lambda e: e.get("step", -1))


def _is_better(value, than, mode: str) -> bool:
    return value < than if mode == "min" else value > than


def passes_memorization_guard(metrics: dict | None, max_memorization: float | None) -> bool:
    """checkpoint.max_memorization: True without a guard, else only for a measured memorization value
    (fraction of generated images flagged as copies) at or below it; no value (not evaluated) fails."""
    if not max_memorization:
        return True
    value = (metrics or {}).get("memorization")
    return isinstance(value, (int, float)) and value <= max_memorization  # NaN fails too


def best_entry(entries: list, metric: str | None, mode: str = "min", max_memorization: float | None = None):
    """The entry with the best value of `metric` (entries without it never win), or None. With
    `max_memorization`, only entries that pass the memorisation guard compete (a memorised
    evaluation never becomes best, however realistic)."""
    best = None
    for entry in entries:
        value = (entry.get("metrics") or {}).get(metric) if metric else None
        if not passes_memorization_guard(entry.get("metrics"), max_memorization):
            continue
        if isinstance(value, (int, float)) and value == value:  # NaN never wins
            if best is None or _is_better(value, best["metrics"][metric], mode):
                best = entry
    return best


def _open(path: Path, mmap: bool = False):
    """torch.load with weights_only; every failure becomes a one-line UsageError naming `path`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a checkpoint") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None
    except Exception as exc:
        if "Unsupported global" in str(exc):  # a torch file of Python objects: never run its code
            raise UsageError(
                f"{path}: not an hpcgan checkpoint (it holds Python objects that weights-only loading refuses)"
            ) from None
        raise UsageError(f"{path}: truncated or corrupt checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: not an hpcgan checkpoint")
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise UsageError(
            f"{path}: checkpoint format_version {state.get('format_version')!r} is not supported "
            f"(this hpcgan reads {CHECKPOINT_FORMAT_VERSION})"
        )
    return state


def find_latest_valid(directory, max_step: int | None = None) -> Path | None:
    """Newest checkpoint in `directory` whose sha256 matches the index and that loads; a
    truncated or corrupt one is skipped with a warning naming it. Without an index, the
    ckpt-*.pt files are tried newest first (then only damage to the file's structure is found).
    `max_step`: only checkpoints of that step or earlier (a rollback never jumps forward)."""
    directory = Path(directory)
    entries = read_index(directory)
    if not entries:
        entries = [{"file": p.name, "sha256": None} for p in sorted(directory.glob("ckpt-*.pt"))]
    for entry in reversed(entries):
        if max_step is not None and entry.get("step", -1) > max_step:
            continue
        path = directory / entry["file"]
        if not path.is_file():
            log.warning("%s: listed in %s but missing; skipping it", path, INDEX_NAME)
            continue
        if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            log.warning("%s: sha256 does not match %s (truncated or corrupt); skipping it", path, INDEX_NAME)
            continue
        try:
            _open(path, mmap=True)  # mmap: checks the structure without reading every tensor
        except UsageError as exc:
            log.warning("%s; skipping it", exc)
            continue
        return path
    return None


def resolve_checkpoint(path) -> Path:
    """A checkpoint file; the `best` or `latest` pointer of a checkpoints/ directory → the file it names;
    a checkpoints/ directory or a run directory holding one → its newest valid checkpoint. UsageError
    naming the path when there is none."""
    path = Path(path)
    if path.is_file() and path.name in POINTERS and path.stat().st_size < 1024:  # a pointer, not a checkpoint
        target = path.parent / read_pointer(path)
        if target.parent != path.parent or not target.is_file():
            raise UsageError(f"{path}: names {target.name!r}, which is not a checkpoint in {path.parent}")
        return target
    if path.is_file():
        return path
    if not path.exists():
        raise UsageError(f"{path}: no such checkpoint file or directory")
    directory = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if not (directory / INDEX_NAME).exists() and not any(directory.glob("ckpt-*.pt")):
        raise UsageError(f"{path}: neither a checkpoint nor a directory of checkpoints")
    found = find_latest_valid(directory)
    if found is None:
        raise UsageError(f"{directory}: no valid checkpoint (all truncated or corrupt)")
    return found


def peek_checkpoint(path) -> dict:
    """A checkpoint file memory-mapped: its config, step and tensor shapes at once, the data read only when
    touched (a check on every rank before training, without N copies in memory)."""
    return _open(Path(path), mmap=True)


def load_checkpoint(path) -> dict:
    """Load a checkpoint (file, checkpoints/ dir or run dir) on the CPU, weights only."""
    return _open(resolve_checkpoint(path))
