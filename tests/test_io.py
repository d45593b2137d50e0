"""Atomic output (hpcgan/io.py): a failed write leaves nothing behind; modes of outputs follow the umask the
commands set (private by default)."""

import os
import stat
from pathlib import Path

import pytest

from hpcgan.errors import UsageError
from hpcgan.io import (
    GROUP_READABLE_ENV,
    atomic_path,
    fsync_file,
    group_readable_from_env,
    make_temp_dir,
    remove_temp_files,
    write_bytes_atomic,
    write_csv_atomic,
    write_json_atomic,
)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(target, {"a": 1})
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_files_and_temp_dirs_take_their_mode_from_the_umask_without_swapping_it(tmp_path, monkeypatch):
    """The process umask decides (0640/0750 under 027) and is never read by swapping it: the checkpoint
    thread writes while the training thread creates files, and a umask briefly 0 would make those 0666.
    Fails on a main that calls os.umask in atomic_path."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask called while writing"))
        write_bytes_atomic(tmp_path / "a.json", b"{}")
        folder = make_temp_dir(tmp_path, prefix=".session.")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750 and os.path.basename(folder).startswith(".session.")
    assert remove_temp_files(tmp_path) == []  # nothing left behind; a temp dir is not a temp file


def test_group_readable_from_the_environment():
    assert [group_readable_from_env({GROUP_READABLE_ENV: v}) for v in ("1", "true", "YES", "0", "", "off")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert group_readable_from_env({}) is False
    with pytest.raises(UsageError, match="HPCGAN_GROUP_READABLE='2': expected 1 or 0"):
        group_readable_from_env({GROUP_READABLE_ENV: "2"})


def test_fsync_file_and_csv_tables(tmp_path):
    fsync_file(tmp_path / "missing.jsonl")  # nothing to make durable yet: no error
    write_csv_atomic(tmp_path / "t.csv", ["a", "b"], [[1, None], ["x,y", 0.5]])
    assert (tmp_path / "t.csv").read_text() == 'a,b\n1,\n"x,y",0.5\n'
