"""`hpcgan doctor` (hpcgan/commands/doctor.py): the environment report, on one process and on two ranks of
each backend, and its hint when horovod cannot be imported."""

import os

import pytest

from conftest import REPO, hpcgan_cmd, requires_mpirun, run_cmd, run_hpcgan, run_hpcgan_mpi


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
