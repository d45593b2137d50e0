"""hpcgan's own abort path (issue 17.4). A real fault on one rank mid-training, a damaged gzip chunk of
the dataset that only that rank reads at step 3, raises on that rank alone while the other waits in a
collective. The whole 2-rank job must end within 30 s of the error line with a non-zero exit, and the
error line, naming the shard and the reason, must appear once: not once per rank, and with a traceback
only under --debug. (test_train.test_a_dead_rank_ends_the_job covers a rank killed by a signal, which
only mpirun sees.)"""

import shutil

import h5py
import pytest

from conftest import hpcgan_cmd, mpirun_cmd, requires_mpirun, run_hpcgan, run_until_marker
from hpcgan.data import RankSampler, SliceDataset
from hpcgan.io import read_jsonl
from test_train import train_args

WORLD, BATCH = 2, 4
FAIL_STEP = 3  # the damaged image belongs to the batch of step 3: two steps have been logged before


@pytest.fixture(scope="module")
def gzip_dataset(sample_data, tmp_path_factory):
    """The sample data with gzip and one slice per chunk: damaging one chunk makes exactly one image
    unreadable, so exactly one rank fails."""
    out = tmp_path_factory.mktemp("gzip-dataset") / "dataset"
    run_hpcgan(
        "preprocess",
        "--input",
        sample_data,
        "--output",
        out,
        "--modalities",
        "t1",
        "--slices",
        "60:92",
        "--min-brain-fraction",
        "0",
        "--size",
        "64",
        "--shards",
        "2",
        "--val-fraction",
        "0.5",
        "--compression",
        "gzip",
        "--chunk-slices",
        "1",
        check=True,
        timeout=300,
    )
    return out


def damaged_copy(dataset, tmp_path, rank):
    """A copy of `dataset` whose compressed chunk of the first image `rank` reads at FAIL_STEP is
    zeros (inflate fails on it); returns (copy, shard name, row)."""
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    slices = SliceDataset(copy, "train")
    order = RankSampler(len(slices), rank, WORLD, BATCH).permutation()
    name, row = slices.locate(int(order[(FAIL_STEP - 1) * BATCH * WORLD + rank * BATCH]))
    with h5py.File(copy / name, "r") as f:
        chunk = f["images"].id.get_chunk_info_by_coord((row, 0, 0, 0))
    with open(copy / name, "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(bytes(chunk.size))
    return copy, name, row


# Four of the eight combinations, each pair of (backend, failing rank, --debug) once: the three are
# independent (the backend decides how the other rank's collective fails, the rank whether the
# coordinator is the one that fails, --debug only what the failing rank prints), and each launch
# takes 20-40 s on a loaded 2-core machine.
@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize(
    "backend, rank, debug",
    [
        ("horovod", 0, False),
        ("horovod", 1, True),
        ("torch", 0, True),
        ("torch", 1, False),
    ],
)
def test_an_exception_on_one_rank_ends_the_job_with_one_error_line(gzip_dataset, tmp_path, backend, rank, debug):
    dataset, shard, row = damaged_copy(gzip_dataset, tmp_path, rank)
    run = tmp_path / "run"
    cmd = mpirun_cmd(WORLD) + hpcgan_cmd(
        *train_args(dataset, run, 100, "loss.type=hinge"), "--backend", backend, *(["--debug"] if debug else [])
    )
    code, lines, seconds = run_until_marker(cmd, "hpcgan train: error")
    output = "\n".join(lines)
    assert code != 0, output[-3000:]
    assert seconds < 30, f"the job ended {seconds:.0f} s after the error line"
    errors = [line for line in lines if "hpcgan train: error" in line]
    assert len(errors) == 1, output[-3000:]
    assert f"{shard}: image {row} is unreadable" in errors[0], errors[0]
    assert ("Traceback" in output) == debug, output[-3000:]
    # It failed mid-training: the steps before the damaged batch were logged, none after.
    assert [line["step"] for line in read_jsonl(run / "metrics.jsonl")] == list(range(1, FAIL_STEP))
