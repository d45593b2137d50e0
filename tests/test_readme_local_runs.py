"""README.md "Local runs": the documented commands, run as written, so the docs cannot drift.

The bash block of that section is run line by line in an empty temp dir (its `data/` and `runs/`
paths are relative), with `source .venv/bin/activate` done as `.venv/bin` first on PATH. The
mpirun and horovodrun trainings must both finish, and, being the same 2-rank Horovod training with
the same seed, write the same weights.
"""

import os
import re
import shlex

import pytest
import torch

from hpcgan.training.checkpointing import find_latest_valid, load_checkpoint
from conftest import REPO, mpi_env, requires_mpirun, run_cmd

pytestmark = [pytest.mark.mpi, pytest.mark.slow, requires_mpirun]


def local_runs_block() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Local runs\n(.*?)(?=^## )", readme + "\n## end", re.S | re.M)
    assert section, "README.md has no '## Local runs' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
    assert block, "the Local runs section has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_local_runs_work_as_written(tmp_path):
    lines = local_runs_block()
    assert lines[0] == "source .venv/bin/activate"
    launchers = [shlex.split(line)[0] for line in lines[1:]]
    assert "mpirun" in launchers and "horovodrun" in launchers, lines
    env = mpi_env(
        {"PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(REPO / ".venv")}
    )
    for line in lines[1:]:
        result = run_cmd(["bash", "-c", f"set -euo pipefail; {line}"], env=env, cwd=tmp_path, timeout=240)
        assert result.returncode == 0, f"README line failed ({result.returncode}): {line}\n{result.stderr[-3000:]}"

    states = {}
    for line in lines[1:]:
        words = shlex.split(line)
        if words[0] in ("mpirun", "horovodrun"):
            run_dir = tmp_path / words[words.index("--out") + 1]
            steps = int(re.search(r"train\.steps=(\d+)", line).group(1))
            state = load_checkpoint(find_latest_valid(run_dir / "checkpoints"))
            assert (state["step"], state["world_size"]) == (steps, 2), line
            states[words[0]] = state
    for name, tensor in states["mpirun"]["G"].items():
        assert torch.equal(tensor, states["horovodrun"]["G"][name]), f"generator weight {name} differs"
