"""Rank 0's checkpoint writer: a host copy of the state, then a background write that is atomic (temp name,
fsync, rename), hashed on the way, indexed, rotated to the last K plus the best, and whose failure (a full disk)
stops training at the next step with one line."""

import hashlib
import threading
from pathlib import Path

import numpy as np
import torch

from hpcgan.errors import HpcganError, UsageError
from hpcgan.io import (
    atomic_path,
    fsync_file,
    is_disk_full,
    remove_temp_files,
    write_bytes_atomic,
    write_json_atomic,
)
from hpcgan.log import get_logger
from hpcgan.training.checkpointing.files import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    INDEX_NAME,
    best_entry,
    checkpoint_name,
    read_index,
)

log = get_logger("checkpoint")

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


class CheckpointWriter:
    """Writes checkpoints of rank 0 in a background thread, one at a time.

    `submit` waits for the previous write, copies the state to host memory (the caller may go on
    changing its tensors as soon as it returns) and starts the write; `flush` waits for it and
    raises its error, if any. Keeps the last `keep_last` checkpoints plus the best one by
    `best_metric` (lower is better with best_mode="min", higher with "max"), among the checkpoints
    whose memorization is at most `max_memorization` when that is given (no `best` file while none is).
    `describes`: files the checkpoints describe (the run's metrics.jsonl, appended by the training thread
    before `submit`), fsynced with their directory before each checkpoint is renamed into place: a crash
    just after the rename never leaves a log that lacks the lines of the checkpoint's step."""

    def __init__(
        self,
        directory,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        max_memorization: float | None = None,
        describes: tuple = (),
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
        self.describes = tuple(describes)
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
            for described in self.describes:  # on disk before the rename below makes this checkpoint visible
                fsync_file(described)
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
