"""The GPU paths, on a CUDA machine (skipped elsewhere; benchmarks/gpu_check.sh runs them): fp16 AMP with
its gradient scalers on both backends, bf16, the NCCL world check with a SyncBatchNorm forward, and a
deterministic resume that is bit-exact on the GPU."""

import pytest
import torch

from conftest import run_hpcgan, run_hpcgan_mpi
from test_resume import differences
from test_train import PURE, load_ckpt, train_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ON_GPU = ["--device", "cuda"]


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_fp16_amp_with_gradient_scalers_and_fp16_allreduce(backend, sample_dataset, tmp_path):
    run_hpcgan_mpi(
        1,
        *train_args(
            sample_dataset, tmp_path / "run", 6, "train.amp=fp16", "train.fp16_allreduce=true", "train.sync_bn=true"
        ),
        "--backend",
        backend,
        *ON_GPU,
        check=True,
        timeout=300,
    )
    ckpt = load_ckpt(tmp_path / "run")
    assert ckpt["step"] == 6 and ckpt["config"]["train"]["amp"] == "fp16"
    for key in ("scaler_G", "scaler_D"):
        assert ckpt[key] is not None and ckpt[key]["scale"] >= 1.0, ckpt[key]
    assert all(torch.isfinite(t).all() for t in ckpt["G"].values() if t.is_floating_point())


def test_bf16_trains_on_the_gpu(sample_dataset, tmp_path):
    run_hpcgan(*train_args(sample_dataset, tmp_path / "run", 4, "train.amp=bf16"), *ON_GPU, check=True, timeout=300)
    ckpt = load_ckpt(tmp_path / "run")
    assert ckpt["scaler_G"] is None and all(
        torch.isfinite(t).all() for t in ckpt["D"].values() if t.is_floating_point()
    )


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_doctor_checks_nccl_and_sync_batchnorm_on_the_gpu(backend):
    result = run_hpcgan_mpi(1, "doctor", "--backend", backend, *ON_GPU, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{backend} allreduce/broadcast and a SyncBatchNorm forward on cuda:0 across 1 rank(s): ok" in result.stdout


def test_deterministic_resume_is_bit_exact_on_the_gpu(sample_dataset, tmp_path):
    sets = [*PURE, "train.deterministic=true", "checkpoint.every_steps=3"]
    run_hpcgan(*train_args(sample_dataset, tmp_path / "whole", 6, *sets), *ON_GPU, check=True, timeout=300)
    run_hpcgan(*train_args(sample_dataset, tmp_path / "parts", 3, *sets), *ON_GPU, check=True, timeout=300)
    run_hpcgan(
        *train_args(sample_dataset, tmp_path / "parts", 6, *sets), *ON_GPU, "--resume", "auto", check=True, timeout=300
    )
    whole, parts = load_ckpt(tmp_path / "whole", 6), load_ckpt(tmp_path / "parts", 6)
    assert differences(whole["G"], parts["G"]) == [] and differences(whole["D"], parts["D"]) == []
    assert differences(whole["opt_G"], parts["opt_G"]) == []
