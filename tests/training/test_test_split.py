"""The test split (`hpcgan preprocess --test-fraction`) is never read by training: not by the data loader's
workers, not by the evaluation during training, not by the memorisation guard. Its shard is replaced by bytes
that no HDF5 reader can open, and a 2-rank run with every one of them switched on still succeeds."""

import json
import shutil

import pytest

from conftest import requires_mpirun, run_hpcgan_mpi
from hpcgan.data import read_slices
from hpcgan.errors import HpcganError
from test_train import train_args

EVERY_READER = [
    "train.num_workers=1",
    "eval.every_steps=2",
    "eval.metrics=[swd,memorization]",
    "eval.num_images=16",
    "checkpoint.every_steps=2",
    "checkpoint.max_memorization=0.5",
]


@pytest.fixture(scope="module")
def dataset_with_unreadable_test_split(three_split_dataset, tmp_path_factory):
    """The three-split dataset (one subject per split), its test shard overwritten with garbage."""
    out = tmp_path_factory.mktemp("test-split") / "dataset"
    shutil.copytree(three_split_dataset, out)
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert [splits[s]["subjects"] for s in ("train", "val", "test")] == [1, 1, 1]
    (shard,) = splits["test"]["shards"]
    (out / shard).write_bytes(b"not an HDF5 file\n" * 1000)
    return out


@requires_mpirun
@pytest.mark.mpi
def test_training_evaluation_and_the_guard_never_read_the_test_split(dataset_with_unreadable_test_split, tmp_path):
    dataset = dataset_with_unreadable_test_split
    with pytest.raises(HpcganError, match="unreadable"):  # what any reader of the test split would meet
        read_slices(dataset, "test")
    run = tmp_path / "run"
    result = run_hpcgan_mpi(2, *train_args(dataset, run, 4, *EVERY_READER), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [e["eval"] for e in evaluations if "eval" in e]
    assert len(evaluations) == 2 and all("memorization" in e and "swd" in e for e in evaluations)
