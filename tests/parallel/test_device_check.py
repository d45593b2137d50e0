"""GPU readiness that a CPU machine can show: the world check on the training device (its watchdog;
`hpcgan doctor`'s report of it is in test_doctor.py), the SyncBatchNorm check's batches and its verdict on
unsynchronised statistics, fp16 gradient compression divided before the sum on both backends, the collective
timeout, and train.amp refused where the device cannot run it."""

import time

import pytest
import torch

from hpcgan.errors import HpcganError, UsageError
from hpcgan.parallel.backend import Backend
from hpcgan.parallel.device_check import check_sync_bn_stats, sync_batchnorm_forward, sync_bn_batch, synced_bn_stats
from hpcgan.training.checks import check_amp, load_train_config

from conftest import REPO, requires_mpirun, run_python_mpi

SCRIPT = REPO / "tests" / "mpi_scripts" / "collectives_check.py"


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_fp16_allreduce_divides_before_the_sum(backend, tmp_path):
    run_python_mpi(2, SCRIPT, "fp16", backend, tmp_path, timeout=180, check=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True)
        grad = got["grad"].flatten()
        assert torch.isfinite(grad).all(), grad  # 40000 + 40000 in fp16 is inf
        assert grad[0].item() == 40000.0 and grad[2].item() == 1.0
        assert grad[1].item() == pytest.approx(4.5e-3, rel=1e-3)  # the mean of 3e-3 and 6e-3, in fp16
        if backend == "horovod":  # the collective timeout became Horovod's stall shutdown
            assert got["stall_shutdown"] == "120"


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_a_stalled_device_check_ends_the_job_in_seconds_with_a_line(backend, tmp_path):
    start = time.monotonic()
    result = run_python_mpi(2, SCRIPT, "stall", backend, tmp_path, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 40  # not rank 1's 60 s sleep, nor a collective timeout
    line = f"error: device check: {backend} allreduce/broadcast on cpu did not finish within 3 s on rank 0"
    assert line in result.stderr, result.stderr[-3000:]


def own_bn_stats(rank):
    """A plain BatchNorm's running statistics after one forward of rank `rank`'s batch (momentum 1)."""
    bn = torch.nn.BatchNorm2d(2, momentum=1.0).train()
    bn(sync_bn_batch(rank))
    return bn.running_mean, bn.running_var


@pytest.mark.parametrize("world", [2, 3, 4, 7, 64])
def test_sync_bn_batches_have_statistics_that_no_rank_has_alone(world):
    mean, var = synced_bn_stats(world)
    n = 32 * world  # values per channel: 2 images x 16 pixels per rank
    assert mean.tolist() == pytest.approx([(world - 1) / 2] * 2)  # by hand: ranks' means 0..world-1, spread 1 each
    assert var.tolist() == pytest.approx([(1 + (world**2 - 1) / 12) * n / (n - 1)] * 2, rel=1e-5)
    check_sync_bn_stats(mean, var, 0, world, "cuda:0")  # the synchronised statistics pass...
    for rank in range(world):  # ...and every rank's own fail, the middle rank of an odd world included
        with pytest.raises(HpcganError, match=f"on rank {rank}, expected .* over {world} ranks.*not synchronised"):
            check_sync_bn_stats(*own_bn_stats(rank), rank, world, "cuda:0")


def test_the_sync_batchnorm_forward_fails_when_statistics_are_not_synchronised():
    """The check's forward with a layer that keeps each rank's own statistics (what the one-process
    backend's convert_sync_batchnorm gives) on ranks 0 and 1 of 2: both refuse; alone it passes."""
    backend = Backend(device="cpu")
    sync_batchnorm_forward(backend, torch.device("cpu"), 0, 1)
    for rank in (0, 1):
        with pytest.raises(HpcganError, match=f"SyncBatchNorm on cpu gave a batch mean {rank:g} .* on rank {rank}"):
            sync_batchnorm_forward(backend, torch.device("cpu"), rank, 2)


@pytest.mark.mpi
@requires_mpirun
def test_the_collective_timeout_bounds_a_wait_for_a_missing_rank(tmp_path):
    result = run_python_mpi(2, SCRIPT, "timeout", "torch", tmp_path, timeout=120)
    assert "rank 0: CollectiveError after" in result.stdout, result.stdout + result.stderr[-3000:]
    waited = int(result.stdout.split("CollectiveError after ")[1].split()[0])
    assert 4 <= waited < 30


def test_collective_timeout_is_validated():
    with pytest.raises(UsageError, match="train.collective_timeout_s: must be >= 60, got 5"):
        load_train_config("wgan-gp-64", ["train.collective_timeout_s=5"])


def test_amp_is_checked_against_the_device(monkeypatch, warnings_of_hpcgan):
    fp16 = load_train_config("wgan-gp-64", ["train.amp=fp16"])
    bf16 = load_train_config("wgan-gp-64", ["train.amp=bf16"])
    compressed = load_train_config("wgan-gp-64", ["train.fp16_allreduce=true"])
    with pytest.raises(UsageError, match="fp16 needs CUDA"):
        check_amp(fp16, "cpu", "wgan-gp-64")
    check_amp(bf16, "cpu", "wgan-gp-64")  # CPUs run bf16 autocast
    assert "gradients below 6e-8 vanish" not in warnings_of_hpcgan.text
    check_amp(compressed, "cpu", "wgan-gp-64")
    assert "gradients below 6e-8 vanish" in warnings_of_hpcgan.text
    # A V100 (compute capability 7.0) as torch reports it: fp16 is fine, bf16 is refused at config time.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    check_amp(fp16, "auto", "wgan-gp-64")
    with pytest.raises(
        UsageError,
        match=r"'train.amp' bf16 is not supported by Tesla V100-SXM2-32GB "
        r"\(compute capability 7.0 < 8.0\): use fp16",
    ):
        check_amp(bf16, "auto", "wgan-gp-64")
    check_amp(bf16, "cpu", "wgan-gp-64")  # --device cpu on a GPU node: bf16 on the CPU
