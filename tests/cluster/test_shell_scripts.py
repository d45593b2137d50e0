"""Every shell script in the repository parses (`bash -n`) and passes `shellcheck -S warning`: the
scripts under scripts/, slurm/ (with the .sbatch files and the sourced common.sh), containers/, .ci/run
and the test helpers, plus the shell inside containers/hpcgan.def and the Dockerfile's RUN lines.
`make lint` runs this file."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

SHELLCHECK = shutil.which("shellcheck")
# Checks left off everywhere, as {code: reason}. Empty today: fix the script, or add a justified entry
# (a one-off false positive gets a `# shellcheck disable=SCxxxx  # why` on its line instead).
SHELLCHECK_EXCLUDE: dict[str, str] = {}
# Apptainer definition sections that hold shell code (the rest are data: %files, %labels, %help...).
DEF_SHELL_SECTIONS = ("post", "environment", "runscript", "test")


def tracked_files() -> list[Path]:
    """The repository's files: tracked, and new ones git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [REPO / name for name in out.decode().split("\0") if name and (REPO / name).exists()]


def is_shell_script(path: Path) -> bool:
    if path.suffix in (".sh", ".sbatch") or path.name == "run" and path.parent.name == ".ci":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(256).decode(errors="replace")
    first = head.splitlines()[0] if head else ""
    return bool(re.match(r"#!\s*\S*(/bash|/sh|env bash|env sh)\b", first)) or "# shellcheck shell=" in head


SHELL_SCRIPTS = sorted(p for p in tracked_files() if is_shell_script(p))


def embedded_shell() -> dict[str, str]:
    """{label: shell code} for the shell inside the container recipes, with the build arguments
    ({{ NAME }} in the .def, ${NAME} in the Dockerfile) left as shell variables."""
    snippets = {}
    section = None
    lines: dict[str, list[str]] = {}
    for line in (REPO / "containers" / "hpcgan.def").read_text().splitlines():
        if line.startswith("%"):
            section = line[1:].strip()
            continue
        if section in DEF_SHELL_SECTIONS:
            lines.setdefault(section, []).append(re.sub(r"\{\{\s*(\w+)\s*\}\}", r"${\1}", line))
    for name, body in lines.items():
        snippets[f"containers/hpcgan.def %{name}"] = "\n".join(body) + "\n"
    dockerfile = (REPO / "containers" / "Dockerfile").read_text().replace("\\\n", " ")
    for i, command in enumerate(re.findall(r"^RUN (.+)$", dockerfile, re.M)):
        snippets[f"containers/Dockerfile RUN #{i + 1}"] = command + "\n"
    return snippets


def bash_syntax_error(script: str) -> str:
    """bash -n's complaint about shell code, '' when it parses."""
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    return proc.stderr.strip() if proc.returncode else ""


def shellcheck(args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    exclude = ["--exclude", ",".join(SHELLCHECK_EXCLUDE)] if SHELLCHECK_EXCLUDE else []
    cmd = [SHELLCHECK, "-S", "warning", "-x", *exclude, *args]
    return subprocess.run(cmd, cwd=REPO, input=script, capture_output=True, text=True)


needs_shellcheck = pytest.mark.skipif(
    SHELLCHECK is None, reason="shellcheck is not installed (scripts/setup.sh installs it as root on Debian)"
)


def test_the_scripts_users_run_are_all_found():
    found = {str(p.relative_to(REPO)) for p in SHELL_SCRIPTS}
    expected = {
        ".ci/run",
        "containers/install.sh",
        "scripts/setup.sh",
        "scripts/demo.sh",
        "slurm/common.sh",
        "slurm/pipeline.sh",
        "slurm/train.sbatch",
        "slurm/preprocess.sbatch",
        "slurm/sample.sbatch",
        "slurm/evaluate.sbatch",
        "slurm/sweep.sbatch",
        "tests/scripts/apptainer-stand-in.sh",
    }
    assert expected <= found, expected - found
    labels = set(embedded_shell())
    assert {"containers/hpcgan.def %post", "containers/hpcgan.def %test", "containers/Dockerfile RUN #1"} <= labels


def test_a_quote_inside_a_parameter_expansion_is_caught():
    """The mistake that broke containers/install.sh: an apostrophe inside ${VAR:?message}."""
    broken = ': "${OMPI_VERSION:?OMPI_VERSION, e.g. 4.1.6 (the host\'s Open MPI)}"\n'
    assert "unexpected EOF" in bash_syntax_error(broken)
    assert bash_syntax_error(': "${OMPI_VERSION:?OMPI_VERSION, e.g. 4.1.6}"\n') == ""


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_parses(path):
    assert bash_syntax_error(path.read_text()) == "", path


@pytest.mark.parametrize("label", sorted(embedded_shell()))
def test_container_recipe_shell_parses(label):
    assert bash_syntax_error(embedded_shell()[label]) == "", label


@needs_shellcheck
def test_shellcheck_is_clean_on_every_script():
    proc = shellcheck([str(p.relative_to(REPO)) for p in SHELL_SCRIPTS])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_shellcheck
@pytest.mark.parametrize("label", sorted(embedded_shell()))
def test_shellcheck_is_clean_on_container_recipe_shell(label):
    proc = shellcheck(["--shell", "bash", "-"], embedded_shell()[label])
    assert proc.returncode == 0, f"{label}:\n{proc.stdout}{proc.stderr}"
