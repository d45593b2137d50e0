"""Checkpoint files: format, background writer, validation and loading.

A checkpoint is a dict saved by `torch.save` that loads with
`torch.load(path, map_location="cpu", weights_only=True)`: tensors, numbers, strings, lists,
tuples, dicts and None only, so a checkpoint from someone else cannot run code. Keys:
`format` ("hpcgan-checkpoint"), `format_version` (1), and what the training coordinator passes
(hpcgan_version, config, dataset, step, epoch, batch_in_epoch, G, D, G_ema, opt_G, opt_D,
scalers, rng and rank_buffers (one entry per rank), metrics). G and D hold batch-norm statistics
averaged over ranks (what sampling uses); rank_buffers each rank's own, for an exact resume.

A checkpoint directory holds:
  ckpt-00001000.pt   one file per checkpoint, written to a temp name, fsynced, renamed
  checkpoints.json   index: [{file, step, sha256, metrics}], oldest first (written atomically)
  latest, best       a line with the file name of the newest / best checkpoint (replaced atomically); with
                     checkpoint.max_memorization, best is absent while no evaluated checkpoint passes the guard
"""

import hashlib
import json
import random
import threading
from pathlib import Path

import numpy as np
import torch

from hpcgan.errors import HpcganError, UsageError
from hpcgan.io import atomic_path, is_disk_full, remove_temp_files, sha256_file, write_bytes_atomic, write_json_atomic
from hpcgan.log import get_logger

CHECKPOINT_FORMAT = "hpcgan-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
INDEX_NAME = "checkpoints.json"
CHECKPOINTS_DIR = "checkpoints"

log = get_logger("checkpoint")


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


# ---------------------------------------------------------------- RNG state


def _cuda_device(device) -> torch.device | None:
    """The CUDA device whose RNG a rank owns: `device` if it is one, the current CUDA device when
    none is given and CUDA is available, else None (a CPU rank)."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def capture_rng_state(device=None) -> dict:
    """This process's RNG states (torch CPU, the rank's own CUDA device, numpy global, Python
    `random`) as tensors, ints, floats and lists only, so that weights_only loading accepts them.
    Only the rank's own CUDA generator is saved: the others belong to other ranks, and a list indexed
    by device number would hand a rank someone else's stream after a resume that sees the GPUs in
    another order or number (CUDA_VISIBLE_DEVICES per rank, another node layout)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = _cuda_device(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(cuda) if cuda is not None else None,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict, device=None):
    """Exact inverse of `capture_rng_state`; the saved CUDA state goes into this rank's own device
    (none on a CPU rank; a CUDA rank resuming a CPU run keeps its seeded CUDA stream)."""
    torch.set_rng_state(state["torch"])
    cuda, saved = _cuda_device(device), state.get("cuda")
    if isinstance(saved, (list, tuple)):
        # Older checkpoints hold every visible device's state. A rank used cuda:<local rank mod count>, so
        # under the same visibility its own stream is the entry of its current device index; with one
        # device per rank visible it is the only entry. Other layouts cannot be told apart: entry 0.
        index = cuda.index if cuda is not None and cuda.index < len(saved) else 0
        saved = saved[index] if saved else None
    if cuda is not None and saved is not None:
        torch.cuda.set_rng_state(saved, cuda)
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ---------------------------------------------------------------- host copy

# Leaf types that torch.load(weights_only=True) accepts back.
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def to_host(obj, key: str = "state", into=None):
    """Deep copy of a nested state: tensors become detached CPU copies (pinned when CUDA is
    available, so device-to-host copies overlap), containers are copied, plain values kept.
    `into`: a previous result of the same structure whose tensors are free to be overwritten;
    tensors of the same shape and dtype are copied into them (no allocation, no page faults:
    several times faster than fresh copies for a large model). Anything weights_only loading would
    refuse (numpy arrays, objects) raises HpcganError naming its key, here in the training thread
    rather than at resume time."""
    pinned = torch.cuda.is_available()
    out = _copy(obj, key, pinned, into)
    if pinned:
        torch.cuda.synchronize()  # the non-blocking copies have landed before anyone reads them
    return out


def _copy(obj, key, pinned, into):
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if (
            isinstance(into, torch.Tensor)
            and into.shape == t.shape
            and into.dtype == t.dtype
            and into.device.type == "cpu"
            and into.is_contiguous()
        ):
            return into.copy_(t, non_blocking=pinned)
        if t.is_cuda and pinned:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return {k: _copy(v, f"{key}.{k}", pinned, into.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(_copy(v, f"{key}[{i}]", pinned, into[i]) for i, v in enumerate(obj))
    if isinstance(obj, np.generic) and obj.ndim == 0:
        return obj.item()  # numpy scalars (e.g. metrics) as Python numbers
    if isinstance(obj, _PLAIN):
        return obj
    raise HpcganError(
        f"checkpoint state '{key}': {type(obj).__name__} cannot be saved in a weights_only "
        "checkpoint (use tensors, numbers, strings, lists, dicts)"
    )


class _HashingFile:
    """A write-only file that hashes what goes through it: the checksum costs no second read."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


# ---------------------------------------------------------------- index


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


# ---------------------------------------------------------------- writer


class CheckpointWriter:
    """Writes checkpoints of rank 0 in a background thread, one at a time.

    `submit` waits for the previous write, copies the state to host memory (the caller may go on
    changing its tensors as soon as it returns) and starts the write; `flush` waits for it and
    raises its error, if any. Keeps the last `keep_last` checkpoints plus the best one by
    `best_metric` (lower is better with best_mode="min", higher with "max"), among the checkpoints
    whose memorization is at most `max_memorization` when that is given (no `best` file while none is)."""

    def __init__(
        self,
        directory,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        max_memorization: float | None = None,
    ):
        if keep_last < 1:
            raise UsageError(f"checkpoint keep_last: must be >= 1, got {keep_last}")
        if best_mode not in ("min", "max"):
            raise UsageError(f"checkpoint best_mode: must be min or max, got {best_mode!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.max_memorization = max_memorization or None
        self.entries = read_index(self.directory)  # a resumed run continues the same index
        self._thread = None
        self._error = None
        self._buffers = None  # the last host copy, written and free: the next copy goes into it
        self._remove_leftovers()

    def _remove_leftovers(self):
        """A job killed mid-write leaves a temp file (never renamed), or, between the rename and the
        index update or between the index update and the rotation, a checkpoint the index does not
        list. None of them is ever read (the index decides), so their space is given back."""
        removed = remove_temp_files(self.directory)
        if self.entries:  # without a readable index every checkpoint file is a candidate: keep them
            listed = {entry["file"] for entry in self.entries}
            for path in sorted(self.directory.glob("ckpt-*.pt")):
                if path.name not in listed:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        for name in removed:
            log.info("%s: removed %s, left by an interrupted write", self.directory, name)

    def submit(self, state: dict, step: int, metrics: dict | None = None):
        self.flush()
        host = to_host(state, into=self._buffers)
        self._buffers = None
        host.update({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION})
        metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float, np.number))}
        host.setdefault("metrics", metrics)
        self._thread = threading.Thread(
            target=self._write_guarded, args=(host, int(step), metrics), name=f"checkpoint-{step}", daemon=False
        )
        self._thread.start()

    def flush(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self):
        self.flush()

    def raise_if_failed(self):
        """Raise the error of a finished background write now, without waiting for one in flight:
        training stops at the next step instead of going on without checkpoints."""
        if self._thread is not None and not self._thread.is_alive():
            self.flush()

    def _write_guarded(self, host, step, metrics):
        try:
            self._write(host, step, metrics)
            self._buffers = host
        except BaseException as exc:  # re-raised by the next submit/flush, in the training thread
            path = self.directory / checkpoint_name(step)
            if is_disk_full(exc):
                self._error = HpcganError(
                    f"{path}: no space left on device; the earlier checkpoints are intact "
                    "(free space, then continue with --resume auto)"
                )
            else:
                reason = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else exc
                self._error = HpcganError(f"{path}: writing the checkpoint failed: {reason}")
            self._error.__cause__ = exc

    def _write(self, host, step, metrics):
        name = checkpoint_name(step)
        path = self.directory / name
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            out = _HashingFile(f)
            torch.save(host, out)
            f.flush()
        entry = {"file": name, "step": step, "sha256": out.sha256.hexdigest(), "metrics": metrics}
        # Entries past `step` belong to a future this run abandoned (resumed from an older one).
        entries = [e for e in self.entries if e.get("step", -1) < step] + [entry]
        entries.sort(key=lambda e: e["step"])
        best = best_entry(entries, self.best_metric, self.best_mode, self.max_memorization)
        kept = [e for i, e in enumerate(entries) if i >= len(entries) - self.keep_last or e is best]
        # Index and pointers first, deletions last: a crash in between leaves orphans, never
        # an index that names a missing file.
        try:
            write_json_atomic(self.directory / INDEX_NAME, kept)
        except BaseException:
            path.unlink(missing_ok=True)  # not indexed, so never used: give its space back (full disk)
            raise
        write_bytes_atomic(self.directory / "latest", f"{name}\n".encode())
        if best is not None:
            write_bytes_atomic(self.directory / "best", f"{best['file']}\n".encode())
        else:
            (self.directory / "best").unlink(missing_ok=True)  # never point at a deleted file
        for old in self.entries + entries:
            if old not in kept and old["file"] != name:
                (self.directory / old["file"]).unlink(missing_ok=True)
        self.entries = kept
        log.debug("wrote %s (%s)", name, entry["sha256"][:12])


# ---------------------------------------------------------------- finding and loading


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
