"""Shared test fixtures: real mpirun launches with a timeout, real brain MRI sample data."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def mpi_env(extra: dict | None = None) -> dict:
    """Environment for a local mpirun: root allowed, no core binding fights, one thread per rank."""
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",  # no ptrace/CMA inside containers
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def run_cmd(cmd, timeout=300, env=None, cwd=None, check=False):
    """Run a command in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and result.returncode != 0:
        pytest.fail(f"exit {result.returncode}: {' '.join(map(str, cmd))}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return result


def hpcgan_cmd(*args) -> list:
    return [sys.executable, "-m", "hpcgan", *map(str, args)]


def mpirun_cmd(np: int = 2) -> list:
    return ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none"]


def run_hpcgan(*args, timeout=300, env=None, check=False):
    return run_cmd(hpcgan_cmd(*args), timeout=timeout, env=env or mpi_env(), check=check)


def run_hpcgan_mpi(np, *args, timeout=300, env=None, check=False):
    return run_cmd(mpirun_cmd(np) + hpcgan_cmd(*args), timeout=timeout, env=mpi_env(env), check=check)


def run_python_mpi(np, script, *args, timeout=300, env=None, check=False):
    return run_cmd(mpirun_cmd(np) + [sys.executable, str(script), *map(str, args)], timeout=timeout,
                   env=mpi_env(env), check=check)


requires_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """Real brain MRI written by `hpcgan sample-data` (MNI152 from nilearn, Colin27 if installed)."""
    out = tmp_path_factory.mktemp("sample-data")
    run_hpcgan("sample-data", out, check=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def sample_dataset(sample_data, tmp_path_factory) -> Path:
    """`hpcgan preprocess` of the sample data at 64x64: t1 with the seg mask, slices 60:108,
    one subject in train and one in val (48 slices each), one shard per split."""
    out = tmp_path_factory.mktemp("sample-dataset") / "dataset"
    run_hpcgan("preprocess", "--input", sample_data, "--output", out, "--modalities", "t1", "--mask", "seg",
               "--slices", "60:108", "--min-brain-fraction", "0", "--size", "64", "--shards", "2",
               "--val-fraction", "0.5", check=True, timeout=300)
    return out
