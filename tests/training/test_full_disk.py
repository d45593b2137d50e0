"""A full disk (issue 11.4), on a real size-limited filesystem (a tmpfs the test mounts): a checkpoint,
a sample stack or a preprocessed shard that hits ENOSPC fails with one line naming the file and "no
space left", leaves no partial file, and keeps what was written before valid (checkpoints indexed, with
matching checksums). Training stops at the failed checkpoint instead of going on without one."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import SAMPLE_DATASET_OPTIONS, run_hpcgan
from hpcgan.training.checkpointing import find_latest_valid, load_checkpoint, read_index
from hpcgan.io import sha256_file
from test_train import train_args

PAGE = 4096
# The shipped wgan-gp-64 model at its own widths (the checkpoint is a few MB, so the run directory's
# small files hardly count), batch 4, no grids or TensorBoard.
FULL_SIZE = [
    "model.g_base_width=16",
    "model.d_base_width=16",
    "model.max_width=128",
    "model.latent_dim=64",
    "checkpoint.keep=10",
    "log.every_steps=1000",
]


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE)


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_bytes) → a directory on a fresh tmpfs of that size; every mount is undone at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size_bytes: int):
        where = tmp_path / f"small-{len(mounted)}"
        where.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={pages(size_bytes) * PAGE}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)])


@pytest.fixture(scope="module")
def reference_run(sample_dataset, tmp_path_factory):
    """Two steps of the shipped model on an ordinary disk, a checkpoint after each: their size sizes the tmpfs."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_hpcgan(*train_args(sample_dataset, run, 2, *FULL_SIZE, "checkpoint.every_steps=1"), check=True)
    return run


def hidden_files(directory):
    return [p.name for p in directory.rglob(".*")]


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_checkpoint_on_a_full_disk_stops_training(sample_dataset, reference_run, small_disk):
    """Checkpoints every 4 steps on a disk with room for two and a half: the third write fails, training
    stops right there (not at the next checkpoint, step 16), the first two stay valid and indexed."""
    used = sum(pages(p.stat().st_size) for p in reference_run.rglob("*") if p.is_file())
    checkpoint = pages((reference_run / "checkpoints" / "ckpt-00000001.pt").stat().st_size)
    # Room for the reference run's files plus half a checkpoint and a few pages more of metrics and temp files.
    disk = small_disk((used + checkpoint // 2 + 8) * PAGE)
    run = disk / "run"
    result = run_hpcgan(
        *train_args(sample_dataset, run, 1000, *FULL_SIZE, "checkpoint.every_steps=4", "log.every_steps=1"), timeout=300
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert f"{run / 'checkpoints' / 'ckpt-00000012.pt'}: no space left on device" in line, line
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 12 <= steps[-1] < 16, steps[-1]
    ckpt_dir = run / "checkpoints"
    index = read_index(ckpt_dir)
    assert [e["step"] for e in index] == [4, 8]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "checkpoints.json",
        "ckpt-00000004.pt",
        "ckpt-00000008.pt",
        "latest",
    ]
    for entry in index:
        assert sha256_file(ckpt_dir / entry["file"]) == entry["sha256"]
    assert find_latest_valid(ckpt_dir).name == "ckpt-00000008.pt"
    assert load_checkpoint(run)["step"] == 8
    assert not hidden_files(run)


def test_sample_stack_on_a_full_disk(reference_run, small_disk):
    """32 kB: less than a stack of 100 images (HDF5, gzip) takes. HDF5 cannot close a file whose flush
    fails (h5py then segfaulted at exit); hpcgan.io.HDF5Output makes it a clean error."""
    out = small_disk(8 * PAGE) / "samples"
    result = run_hpcgan(
        "sample", "--checkpoint", reference_run, "--out", out, "--stack-size", 100, "--format", "h5", timeout=300
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert f"{out / 'stack-00000.h5'}: no space left on device" in line, line
    assert list(out.iterdir()) == []  # no partial stack, no index.json
    assert shutil.disk_usage(out).used == 0  # the space of the removed file came back


def test_preprocess_shard_on_a_full_disk(sample_data, sample_dataset, small_disk):
    """The sample dataset's preprocessing on a disk with room for half of its train shard."""
    shard = max((p.stat().st_size for p in sample_dataset.glob("*.h5")))
    out = small_disk(shard // 2 + 16 * PAGE) / "dataset"
    result = run_hpcgan(
        "preprocess",
        "--input",
        sample_data,
        "--output",
        out,
        *SAMPLE_DATASET_OPTIONS,
        "--shards",
        "2",
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert str(out) in line and ".h5: no space left on device" in line, line
    assert not list(out.rglob("*.h5")) and not (out / "manifest.json").exists()
    assert not [n for n in hidden_files(out) if n.endswith(".tmp.h5") or ".h5." in n]
