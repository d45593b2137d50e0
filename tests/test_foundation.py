"""The foundation: CLI conventions, config validation, atomic output, launch environment, real MRI
sample data, `hpcgan doctor`, and the distributed backends against the single-process result."""
import dataclasses
import os
import sys
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, hpcgan_cmd, requires_mpirun, run_cmd, run_hpcgan, run_hpcgan_mpi, run_python_mpi
from hpcgan.cli import COMMANDS
from hpcgan.config import load_config
from hpcgan.parallel.env import launch_env, slurm_ntasks
from hpcgan.errors import UsageError
from hpcgan.io import atomic_path, write_json_atomic

SCRIPTS = Path(__file__).parent / "mpi_scripts"


# --- CLI ------------------------------------------------------------------------------------------
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


# --- config -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Inner:
    lr: float = 2e-4
    norm: Literal["batch", "none"] = "batch"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 10
    widths: list[int] = dataclasses.field(default_factory=list)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1e-3\nsteps: 5\n")
    cfg = load_config(Outer, path, ["inner.norm=none", "widths=[32, 64]", "steps=7"])
    assert cfg == Outer(Inner(1e-3, "none"), 7, [32, 64])


@pytest.mark.parametrize("yaml_text, overrides, key", [
    ("stepz: 5\n", [], "stepz"),
    ("steps: five\n", [], "steps"),
    ("", ["inner.norm=group"], "inner.norm"),
    ("", ["inner.lr=fast"], "inner.lr"),
    ("inner: 3\n", [], "inner"),
    ("", ["steps"], "steps"),
    ("steps: [1\n", [], "line"),
])
def test_config_errors_name_the_key(tmp_path, yaml_text, overrides, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UsageError) as info:
        load_config(Outer, path, overrides)
    assert key in str(info.value) and "\n" not in str(info.value)


# --- atomic output --------------------------------------------------------------------------------
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


# --- launch environment -----------------------------------------------------------------------------
def test_launch_env_reads_each_launcher():
    alone = launch_env({})  # no launcher: a single process
    assert (alone.rank, alone.world_size, alone.local_rank) == (0, 1, 0)
    assert launch_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "1"}).local_rank == 1
    env = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert launch_env({"PMI_RANK": "1", "PMI_SIZE": "2"}).rank == 1
    assert slurm_ntasks({"SLURM_NTASKS": "4"}) is None  # the batch script, not an srun step
    assert slurm_ntasks({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}) == 4


# --- real MRI sample data ------------------------------------------------------------------------------
def test_sample_data_is_real_brain_mri(sample_data):
    t1 = nib.load(sample_data / "mni152" / "mni152_t1.nii.gz")
    assert t1.shape == (197, 233, 189)
    data = np.asarray(t1.dataobj)
    brain = data > 0
    assert 0.1 < brain.mean() < 0.6  # a skull-stripped brain fills part of the box, not all of it
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
    assert t1.header["descrip"].item() in (b"", "")
    seg = np.asarray(nib.load(sample_data / "mni152" / "mni152_seg.nii.gz").dataobj)
    assert set(np.unique(seg)) == {0, 1, 2} and (seg[~brain] == 0).mean() > 0.99
    if Path("/usr/share/mricron/templates/ch2bet.nii.gz").exists():
        colin = nib.load(sample_data / "colin27" / "colin27_t1.nii.gz")
        assert colin.shape == (181, 217, 181)


# --- doctor ------------------------------------------------------------------------------------------
def test_doctor_single_process():
    result = run_hpcgan("doctor", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for piece in ("python", "torch", "mpi4py", "h5py", "nibabel", "horovod", "slurm"):
        assert piece in result.stdout
    assert "training path: ready" in result.stdout


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_doctor_two_ranks_see_a_world_of_two(backend):
    result = run_hpcgan_mpi(2, "doctor", "--backend", backend, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world of 2" in result.stdout and "[2, 2]" in result.stdout
    # The same collectives on the training device, as every training start runs them.
    assert f"{backend} allreduce/broadcast on cpu across 2 rank(s): ok" in result.stdout


def test_doctor_fails_with_a_hint_when_horovod_is_missing(tmp_path):
    # Shadow horovod with a package that cannot be imported: doctor must say so and exit 1.
    fake = tmp_path / "horovod"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: horovod not built')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    result = run_cmd(hpcgan_cmd("doctor"), env=env, timeout=120)
    assert result.returncode == 1
    assert "horovod" in result.stdout and "make setup" in result.stdout + result.stderr


# --- backends: 2 ranks equal one process -----------------------------------------------------------------
@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_backend_two_ranks_match_single_process(backend, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run_cmd([sys.executable, SCRIPTS / "backend_check.py", "none", tmp_path / "one"], timeout=120, check=True)
    run_python_mpi(2, SCRIPTS / "backend_check.py", backend, tmp_path / "two", timeout=180, check=True)
    single = torch.load(tmp_path / "one" / "rank-0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    for r, res in enumerate(ranks):
        assert res["world"] == 2
        for key, value in single["params"].items():  # averaged gradients = full-batch gradients
            torch.testing.assert_close(res["params"][key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["mean"], torch.tensor([1.5, 5.0]))
        torch.testing.assert_close(res["sum"], torch.tensor([3.0]))
        torch.testing.assert_close(res["max"], torch.tensor([1.0]))
        torch.testing.assert_close(res["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        assert res["object"]["from"] == 0 and res["object"]["t"].tolist() == [0, 1, 2]
        assert res["all_objects"] == [{"rank": 0, "text": "x"}, {"rank": 1, "text": "xx"}]
        assert res["metrics"] == {"loss": 0.5}
    # Bit-identical across ranks, not merely close: the ranks must never drift apart.
    for key in single["params"]:
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key])


@pytest.mark.mpi
@requires_mpirun
def test_log_lines_carry_the_rank():
    result = run_hpcgan_mpi(2, "doctor", "--debug", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "[rank 1/2]" in result.stderr and "[rank 0/2]" in result.stderr
