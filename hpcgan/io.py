"""File output that never leaves anything half-written, and checksums."""
import contextlib
import hashlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same directory as `path`; on success fsync it and rename
    it to `path` (atomic on POSIX), on failure remove it. The temp name starts with '.' and
    keeps the extension (libraries such as nibabel choose the format by it)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    ext = name[name.index("."):] if "." in name.lstrip(".") else ""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp" + ext, dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets the usual mode
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _fsync_dir(directory):
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path, data: bytes):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json_atomic(path, obj):
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_writable_dir(path) -> str:
    """Create `path` if needed and prove we can write there; raise UsageError naming it if not."""
    from hpcgan.errors import UsageError

    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: output directory is not writable ({exc.strerror or exc})") from None
    return path
