"""CLI conventions (hpcgan/cli.py): every command has --help, usage errors are one line and exit 2,
--debug shows the traceback."""

import pytest

from conftest import run_hpcgan
from hpcgan.cli import COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    result = run_hpcgan(command, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"usage: hpcgan {command}" in result.stdout
    assert "--debug" in result.stdout


def test_usage_errors_are_one_line_exit_2(tmp_path):
    result = run_hpcgan("no-such-command")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = run_hpcgan("sample-data", a_file / "sub")  # a file where a directory must go
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(a_file) in lines[0] and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = run_hpcgan("sample-data", a_file / "sub", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
