"""Shared test fixtures: real mpirun launches with a timeout, real brain MRI sample data."""

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def mpi_env(extra: dict | None = None) -> dict:
    """Environment for a local mpirun: root allowed, no core binding fights, one thread per rank."""
    env = dict(os.environ)
    env.update(
        {
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_btl_vader_single_copy_mechanism": "none",  # no ptrace/CMA inside containers
            "OMPI_MCA_rmaps_base_oversubscribe": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def kill_job(pid: int):
    """SIGKILL a command started with start_new_session=True, its process group and every process
    below it. Open MPI puts each rank in a process group of its own: killing mpirun's group alone
    leaves the ranks running (and writing to the run directory) until they notice."""
    import psutil

    try:
        below = psutil.Process(pid).children(recursive=True)  # before the kill re-parents them
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(below, timeout=30)


def run_cmd(cmd, timeout=300, env=None, cwd=None, check=False):
    """Run a command in its own session; on timeout kill it with every process below it and fail."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc.pid)
        out, err = proc.communicate()
        pytest.fail(
            f"timed out after {timeout}s: {' '.join(map(str, cmd))}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        )
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and result.returncode != 0:
        pytest.fail(
            f"exit {result.returncode}: {' '.join(map(str, cmd))}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        )
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
    return run_cmd(
        mpirun_cmd(np) + [sys.executable, str(script), *map(str, args)], timeout=timeout, env=mpi_env(env), check=check
    )


def run_until_marker(cmd, marker, timeout=120):
    """(exit code, output lines, seconds from the first output line containing `marker` to the end of the
    job) of an mpirun command that is expected to end by itself; the test fails if it does not."""
    proc = subprocess.Popen(
        cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines, marked_at = [], []

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if marker in line and not marked_at:
                marked_at.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc.pid)  # every rank, a stopped one too
        proc.wait()
        pytest.fail("the job did not end:\n" + "\n".join(lines[-40:]))
    ended = time.monotonic()
    reader.join(timeout=10)
    assert marked_at, f"no line with {marker!r}:\n" + "\n".join(lines[-40:])
    return proc.returncode, lines, ended - marked_at[0]


@pytest.fixture
def warnings_of_hpcgan(caplog):
    """The hpcgan logger may not propagate (setup_logging), so listen on it directly."""
    logger = logging.getLogger("hpcgan")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="hpcgan")
    yield caplog
    logger.removeHandler(caplog.handler)


requires_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH")


PHI_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")  # a NIfTI header's free-text fields


def write_phi_laden_copy(sample_data: Path, dest: Path, secret: bytes = b"SECRET_John_Doe") -> Path:
    """The sample brains (t1 and seg) under DEST/<subject>/, with `secret` in every free-text header
    field: a source that must leave no trace in anything derived from it."""
    import nibabel as nib
    import numpy as np

    for subject in ("colin27", "mni152"):
        (dest / subject).mkdir(parents=True)
        for modality in ("t1", "seg"):
            image = nib.load(sample_data / subject / f"{subject}_{modality}.nii.gz")
            image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header)
            for field in PHI_FIELDS:
                image.header[field] = secret
            nib.save(image, dest / subject / f"{subject}_{modality}.nii.gz")
    return dest


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """Real brain MRI written by `hpcgan sample-data` (MNI152 from nilearn, Colin27 if installed)."""
    out = tmp_path_factory.mktemp("sample-data")
    run_hpcgan("sample-data", out, check=True, timeout=300)
    return out


# The sample dataset's preprocessing: T1 with the seg mask, axial slices 60-107 at 64x64, one of the two
# subjects for validation.
SAMPLE_DATASET_OPTIONS = (
    "--modalities t1 --mask seg --slices 60:108 --min-brain-fraction 0 --size 64 --val-fraction 0.5".split()
)


@pytest.fixture(scope="session")
def sample_dataset(sample_data, tmp_path_factory) -> Path:
    """`hpcgan preprocess` of the sample data at 64x64: t1 with the seg mask, slices 60:108,
    one subject in train and one in val (48 slices each), one shard per split."""
    out = tmp_path_factory.mktemp("sample-dataset") / "dataset"
    run_hpcgan(
        "preprocess",
        "--input",
        sample_data,
        "--output",
        out,
        *SAMPLE_DATASET_OPTIONS,
        "--shards",
        "2",
        check=True,
        timeout=300,
    )
    return out


# Both sample brains in one 3-class label set (background, grey matter, white matter), for joint image + mask models.
TISSUE = ["--modalities", "t1", "--mask", "tissue", "--slices", "60:108", "--min-brain-fraction", "0", "--size", "64"]
TISSUE += ["--val-fraction", "0.5", "--shards", "2", "--class-names", "background,grey-matter,white-matter"]


@pytest.fixture(scope="session")
def tissue_dataset(sample_data, tmp_path_factory):
    """`hpcgan preprocess` of the sample data at 64x64 with the 3-class tissue mask (TISSUE)."""
    out = tmp_path_factory.mktemp("tissue") / "dataset"
    run_hpcgan("preprocess", "--input", sample_data, "--output", out, *TISSUE, check=True, timeout=300)
    return out


class TinyExtractor(torch.nn.Module):
    """Stands in for InceptionV3 to prove the FID/KID plumbing: (N, 3, 299, 299) → (N, 8) features."""

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # 12 values
        return torch.cat(
            [
                pooled[:, :4],
                x.std(dim=(1, 2, 3))[:, None],
                x.mean(dim=(1, 2, 3))[:, None],
                (x > 0).float().mean(dim=(1, 2, 3))[:, None],
                x.amax(dim=(1, 2, 3))[:, None],
            ],
            dim=1,
        )


@pytest.fixture(scope="session")
def three_split_dataset(sample_data, tmp_path_factory) -> Path:
    """Three subjects at 64x64 (32 slices each), one per split: train, val and a test split
    (`preprocess --test-fraction`). mni152-copy is the MNI152 brain again under another name."""
    root = tmp_path_factory.mktemp("three-splits")
    for name, brain in {"colin27": "colin27", "mni152": "mni152", "mni152-copy": "mni152"}.items():
        (root / "raw" / name).mkdir(parents=True)
        shutil.copy(sample_data / brain / f"{brain}_t1.nii.gz", root / "raw" / name / f"{name}_t1.nii.gz")
    out = root / "dataset"
    options = "--modalities t1 --slices 72:104 --min-brain-fraction 0 --size 64 --shards 1".split()
    fractions = ["--val-fraction", "0.34", "--test-fraction", "0.34"]
    run_hpcgan("preprocess", "--input", root / "raw", "--output", out, *options, *fractions, check=True)
    return out


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory) -> Path:
    """TinyExtractor saved as TorchScript, the file `--fid-weights` takes."""
    import warnings

    path = tmp_path_factory.mktemp("fid") / "tiny-extractor.pt"
    with warnings.catch_warnings():  # torch >= 2.9 calls TorchScript deprecated; it still saves and loads
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyExtractor()).save(str(path))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: 2 cores shared by many test processes make one BLAS thread several
    times faster here (as each of mpirun's ranks has)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli_in_process():
    """hpcgan.cli.main, run in this process: it sets up the hpcgan logger on the captured stderr and the
    umask of private outputs (hpcgan.io.set_output_permissions), both put back afterwards."""
    import logging

    from hpcgan.cli import main

    logger = logging.getLogger("hpcgan")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    umask = os.umask(0o077)
    yield main
    os.umask(umask)
    logger.handlers[:], logger.level, logger.propagate = saved


# Figures that tests measure (image size, time to detect a dead node, cross-node bytes...), printed in
# a section at the end of the run, so that CI's log shows them.
_FIGURES: list[str] = []


@pytest.fixture(scope="session")
def report_figure():
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures measured by the tests")
        for line in _FIGURES:
            terminalreporter.write_line(line)
