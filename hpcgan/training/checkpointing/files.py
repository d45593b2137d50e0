"""Checkpoint files: the format, the index and pointers of a checkpoints/ directory, validation, finding
(the newest for --resume, the run's selected one for everything downstream) and loading.
A checkpoint loads with `torch.load(path, map_location="cpu", weights_only=True)`, so a checkpoint
from someone else cannot run code; every failure to read one is a one-line UsageError naming the file."""

import json
from pathlib import Path

import torch
import yaml

from hpcgan.errors import UsageError
from hpcgan.io import sha256_file
from hpcgan.log import get_logger

log = get_logger("checkpoint")

CHECKPOINT_FORMAT = "hpcgan-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
INDEX_NAME = "checkpoints.json"
CHECKPOINTS_DIR = "checkpoints"
CONFIG_NAME = "config.yaml"  # a run directory's resolved config (hpcgan/training/run_directory.py)


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


def _damage(directory: Path, entry: dict) -> str | None:
    """Why the indexed checkpoint `entry` cannot be used (missing, sha256 mismatch, does not load), or None."""
    path = directory / entry["file"]
    if not path.is_file():
        return f"{path}: listed in {INDEX_NAME} but missing"
    if entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        return f"{path}: sha256 does not match {INDEX_NAME} (truncated or corrupt)"
    try:
        _open(path, mmap=True)  # mmap: checks the structure without reading every tensor
    except UsageError as exc:
        return str(exc)
    return None


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
        damage = _damage(directory, entry)
        if damage is None:
            return directory / entry["file"]
        log.warning("%s; skipping it", damage)
    return None


def resolve_checkpoint(path) -> Path:
    """A checkpoint file; the `best` or `latest` pointer of a checkpoints/ directory → the file it names;
    a checkpoints/ directory or a run directory holding one → its newest valid checkpoint (what --resume
    continues from; sampling and evaluation take `select_checkpoint`'s). UsageError naming the path when
    there is none."""
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


# --- the checkpoint a run selected -------------------------------------------------------------------------


def read_run_config(run_dir) -> dict | None:
    """A run directory's config.yaml as a dict, or None (missing, unreadable, not a mapping)."""
    try:
        with open(Path(run_dir) / CONFIG_NAME) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def run_selection(run_dir) -> dict | None:
    """The checkpoint a run selected (checkpoints/best) and what it was selected by: {"metric":
    checkpoint.best_metric, "guard": checkpoint.max_memorization or None, "checkpoints": how many are indexed,
    "evaluated": how many of those (the last checkpoint.keep and the best) have a value of the metric,
    "file", "step", "sha256", "metrics"} (file, step and sha256 None when none is best, e.g. none passed the
    memorisation guard). None for a run without evaluation during training (nothing to select by). The facts
    `select_checkpoint`, `hpcgan report` and `hpcgan sweep-summary` follow."""
    config = read_run_config(run_dir)
    if config is None or not (config.get("eval") or {}).get("every_steps"):
        return None
    ck = config.get("checkpoint") or {}
    metric = ck.get("best_metric", "swd")
    directory = Path(run_dir) / CHECKPOINTS_DIR
    entries = read_index(directory) if directory.is_dir() else []
    name = read_pointer(directory / "best")
    entry = next((e for e in entries if e.get("file") == name), None) if name else None
    return {
        "metric": metric,
        "guard": ck.get("max_memorization") or None,
        "checkpoints": len(entries),
        "evaluated": sum(isinstance((e.get("metrics") or {}).get(metric), (int, float)) for e in entries),
        "file": entry["file"] if entry else None,
        "step": entry.get("step") if entry else None,
        "sha256": entry.get("sha256") if entry else None,
        "metrics": dict(entry.get("metrics") or {}) if entry else {},
    }


def selection_reason(selection: dict) -> str:
    """One line on why the run selected its checkpoint, e.g. "step 125: best swd 132.8 of the evaluated
    checkpoints (checkpoints/best), memorization 0.0625 <= guard 0.2 (checkpoint.max_memorization)"."""
    metric, guard, metrics = selection["metric"], selection["guard"], selection["metrics"]
    text = f"step {selection['step']}: best {metric} {_number(metrics.get(metric))} of the evaluated checkpoints "
    text += "(checkpoints/best)"
    if not guard:
        return text + ", memorisation guard off"
    memorization = _number(metrics.get("memorization"))
    return text + f", memorization {memorization} <= guard {guard:g} (checkpoint.max_memorization)"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def _step_of(path: Path):
    entry = next((e for e in read_index(path.parent) if e.get("file") == path.name), None)
    return entry.get("step") if entry else peek_checkpoint(path).get("step")


def select_checkpoint(path) -> tuple:
    """(checkpoint file, one line saying which and why) for sampling, evaluation, the Turing test and the report.

    A checkpoint file, or a `latest`/`best` pointer, is that file. A run directory (or its checkpoints/) means
    the checkpoint the run selected: checkpoints/best, the best checkpoint.best_metric among its evaluated
    checkpoints, only those within checkpoint.max_memorization competing when the guard is on. A run that did
    not evaluate during training selected none: its newest valid checkpoint. A run that evaluates but has no
    usable best (no checkpoint passed the guard, none evaluated yet, or best is damaged) is a UsageError: the
    checkpoint the guard rejected is never handed out unasked; RUN/checkpoints/latest asks for the newest.
    `resolve_checkpoint` (the newest, for --resume) is not this."""
    path = Path(path)
    run_dir = path if (path / CHECKPOINTS_DIR).is_dir() else path.parent if path.name == CHECKPOINTS_DIR else None
    selection = run_selection(run_dir) if run_dir is not None and path.is_dir() else None
    if selection is None:
        found = resolve_checkpoint(path)
        step = _step_of(found)
        if path.is_dir():
            has_config = run_dir is not None and read_run_config(run_dir) is not None
            why = "the run did not evaluate during training" if has_config else "no run config.yaml"
            return found, f"step {step}: the newest valid checkpoint ({why}, so nothing was selected)"
        if path.name == "latest":
            return found, f"step {step}: the newest checkpoint (checkpoints/latest), as asked"
        if path.name == "best":
            selection = run_selection(path.parent.parent)
            if selection and selection["file"] == found.name:
                return found, selection_reason(selection)
            return found, f"step {step}: checkpoints/best"
        return found, f"step {step}: the checkpoint file given"
    directory = run_dir / CHECKPOINTS_DIR
    newest = f"pass {directory / 'latest'} to use the newest checkpoint anyway"
    if selection["file"] is None:
        if selection["guard"] and selection["evaluated"]:
            raise UsageError(
                f"{path}: no evaluated checkpoint passed the memorisation guard "
                f"(memorization <= {selection['guard']:g}, checkpoint.max_memorization), so the run selected none; "
                + newest
            )
        raise UsageError(f"{path}: no evaluated checkpoint yet, so the run selected none; " + newest)
    damage = _damage(directory, {"file": selection["file"], "sha256": selection["sha256"]})
    if damage:
        raise UsageError(f"{damage}; it is the run's selected checkpoint (checkpoints/best): {newest}")
    return directory / selection["file"], selection_reason(selection)


def peek_checkpoint(path) -> dict:
    """A checkpoint file memory-mapped: its config, step and tensor shapes at once, the data read only when
    touched (a check on every rank before training, without N copies in memory)."""
    return _open(Path(path), mmap=True)


def load_checkpoint(path) -> dict:
    """Load a checkpoint (file, checkpoints/ dir or run dir) on the CPU, weights only."""
    return _open(resolve_checkpoint(path))
