"""File output that never leaves anything half-written, reading back what a killed writer left,
and checksums."""

import contextlib
import csv
import errno
import io
import hashlib
import json
import os
import re
import secrets
import tempfile

from hpcgan.errors import HpcganError, UsageError
from hpcgan.log import get_logger

log = get_logger("io")

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# Everything the commands write derives from patients: private to the user by default (directories 0700,
# files 0600), group-readable on request (0750, 0640) for a project that shares a group; never world-readable.
PRIVATE_UMASK, GROUP_READABLE_UMASK = 0o077, 0o027
GROUP_READABLE_ENV = "HPCGAN_GROUP_READABLE"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def group_readable_from_env(environ=os.environ) -> bool:
    """HPCGAN_GROUP_READABLE (for Slurm scripts and containers, where a flag is awkward to pass on)."""
    value = environ.get(GROUP_READABLE_ENV, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise UsageError(f"{GROUP_READABLE_ENV}={environ[GROUP_READABLE_ENV]!r}: expected 1 or 0 (true/false)")
    return value in _TRUE


def set_output_permissions(group_readable: bool):
    """Set the process umask once, at command start on every rank, whatever the user's own: then every
    writer (these atomic writers, h5py, torch.save, PIL, nibabel, TensorBoard, os.makedirs) creates private
    files and directories without each having to chmod, and child processes inherit it."""
    os.umask(GROUP_READABLE_UMASK if group_readable else PRIVATE_UMASK)


def _create_unique(directory, prefix: str, suffix: str, create) -> str:
    """`create(path)` on a new random name (8 characters, as tempfile's) in `directory`. Unlike mkstemp and
    mkdtemp (always 0600/0700), `create` opens with 0666/0777 so the umask decides the mode, and nothing
    reads or swaps the process umask (the checkpoint thread writes while the training thread does)."""
    for _ in range(100):
        path = os.path.join(directory, prefix + secrets.token_hex(4) + suffix)
        try:
            create(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.path.join(directory, prefix + "*" + suffix))


def _create_file(path):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def make_temp_dir(parent, prefix: str, suffix: str = ".tmp") -> str:
    """A new directory with a random name in `parent`, with the mode os.mkdir gives (the umask's)."""
    return _create_unique(os.fspath(parent), prefix, suffix, lambda path: os.mkdir(path, 0o777))


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc`, or an exception it came from, is ENOSPC or EDQUOT. torch.save raises its own
    RuntimeError ("unexpected pos") with the OSError as context; h5py sometimes a RuntimeError that
    gives the errno only in its message, so the text is read too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(os.strerror(code) in str(exc) for code in DISK_FULL_ERRNOS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same directory as `path`; on success fsync it and rename
    it to `path` (atomic on POSIX), on failure remove it. The temp name starts with '.' and
    keeps the extension (libraries such as nibabel choose the format by it). A full disk or
    quota becomes one HpcganError naming `path` and "no space left", whatever library wrote."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    ext = name[name.index(".") :] if "." in name.lstrip(".") else ""
    tmp = None
    try:
        tmp = _create_unique(directory, f".{name}.", ".tmp" + ext, _create_file)  # mode: the umask's
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # a full disk can show up only here (delayed allocation, NFS)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        if is_disk_full(exc):
            raise HpcganError(f"{path}: no space left on device (the partial file was removed)") from exc
        raise


class HDF5Output:
    """An HDF5 file being written (`.file`, an h5py.File) that fails cleanly on a full disk. HDF5
    cannot close a file whose last flush fails: the handle stays open, the space stays taken and h5py
    crashes at exit (segfault). So h5py writes through this object (its file-object driver), which
    drops every write after the first failed one; the file then closes as if complete, and `check`
    and `close` raise the saved error (atomic_path removes the incomplete file)."""

    def __init__(self, path, **kwargs):
        import h5py  # here, not above: most users of this module write no HDF5

        self._raw = open(path, "w+b", buffering=0)  # unbuffered: a seek never flushes (and fails) late
        self._error = None
        try:
            self.file = h5py.File(self, "w", **kwargs)
        except BaseException:
            self._raw.close()
            raise

    # --- the file-object protocol h5py uses -------------------------------------------------------
    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while self._error is None and len(view):
            try:
                view = view[self._raw.write(view) :]  # a raw write may take only part
            except OSError as exc:
                self._error = exc
        return size

    def truncate(self, size=None):
        if self._error is None:
            try:
                return self._raw.truncate(size)
            except OSError as exc:
                self._error = exc
        return size

    def flush(self):
        pass  # unbuffered

    def read(self, size=-1):
        return self._raw.read(size)

    def readinto(self, buffer):
        return self._raw.readinto(buffer)

    def seek(self, offset, whence=os.SEEK_SET):
        return self._raw.seek(offset, whence)

    def tell(self):
        return self._raw.tell()

    # --- for the writer -------------------------------------------------------------------------
    def __enter__(self):
        return self.file

    def __exit__(self, *exc_info):
        self.close()

    def check(self):
        """Raise the error of the first failed write, if any (call after each large write)."""
        if self._error is not None:
            raise self._error

    def close(self):
        try:
            self.file.close()
        finally:
            self._raw.close()
        self.check()


def _fsync_dir(directory):
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path):
    """Make what was written to `path` (an append-only log) and its directory entry durable; nothing if it
    does not exist yet."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes_atomic(path, data: bytes):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json_atomic(path, obj):
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_csv_atomic(path, header, rows):
    """A CSV table (`header`, then `rows`; None as an empty cell), written atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if value is None else value for value in row] for row in rows])
    write_bytes_atomic(path, text.getvalue().encode())


# What atomic_path leaves when its process is killed before the rename: "." + name + "." +
# mkstemp's 8 random characters + ".tmp" + extension.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(\..*)?")


def remove_temp_files(directory) -> list:
    """Delete the temporary files of writes that were killed mid-way in `directory` (never
    renamed, so never read); returns their names. Call only where no write is in flight."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False) and _TEMP_NAME.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                removed.append(entry.name)
    return sorted(removed)


def read_json(path, what: str, required: bool = True):
    """A JSON file that a user points at or that a command wrote (`what` names it in errors). Missing:
    a one-line UsageError, or None when not `required`; unreadable or not JSON: a one-line UsageError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if not required:
            return None
        raise UsageError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from None


def read_jsonl(path) -> list:
    """The records (dicts) of an append-only JSON-lines log; [] if there is none. A job killed
    mid-append leaves a last line without its newline: that torn line is dropped with a warning.
    Any other line that is not a JSON object is skipped with a warning naming its number."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    complete, _, torn = data.rpartition(b"\n")
    if torn.strip():
        log.warning("%s: dropping an incomplete last line (%d bytes, an interrupted write)", path, len(torn))
    records = []
    for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s: line %d is not a JSON object; skipping it", path, number)
    return records


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_writable_dir(path) -> str:
    """Create `path` if needed and prove we can write there; raise UsageError naming it if not."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: output directory is not writable ({exc.strerror or exc})") from None
    return path
