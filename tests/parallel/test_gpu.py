"""The GPU paths, on a CUDA machine (skipped elsewhere; benchmarks/gpu_check.sh runs them): fp16 AMP with
its gradient scalers on both backends, bf16, the NCCL world check with a SyncBatchNorm forward, a
deterministic resume that is bit-exact on the GPU, ADA under deterministic mode (the ops refused are exactly
those torch refuses), the joint model with ADA through sample and `evaluate --task segmentation --device
cuda`, and the segmentation task's tensors on the GPU. With 2 GPUs visible, also on 2 ranks (one GPU each):
SyncBatchNorm's synchronised statistics and fp16 gradients divided before the sum, which one rank cannot show."""

import json
import sys

import pytest
import torch

from conftest import run_cmd, run_hpcgan, run_hpcgan_mpi
from test_joint import JOINT_MODEL, TISSUE, preprocess
from test_resume import differences
from test_segmentation import RECIPE, K, load_pairs
from test_train import PURE, load_ckpt, train_args

from hpcgan.augment import ADA_OPS, nondeterministic_ops
from hpcgan.segmentation import predict_labels, task_evaluation, train_segmenter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ON_GPU = ["--device", "cuda"]
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (one per rank)"
)
ADA = ["train.ada_target=0.6", "train.ada_interval=2", "train.ada_speed_images=16"]


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
    line = f"{backend} allreduce/broadcast and a SyncBatchNorm forward on cuda:0 across 1 rank(s): ok (one rank:"
    assert line in result.stdout, result.stdout


@two_gpus
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_gpus_synchronise_batchnorm_statistics(backend):
    """Each rank's batch has statistics of its own (hpcgan.parallel.device_check.sync_bn_batch): the check
    passes only where NCCL really synchronised them."""
    result = run_hpcgan_mpi(2, "doctor", "--backend", backend, *ON_GPU, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    line = f"{backend} allreduce/broadcast and a SyncBatchNorm forward on cuda:0 across 2 rank(s): ok\n"
    assert line in result.stdout, result.stdout  # and without the one-rank note


@two_gpus
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_gpus_train_with_sync_batchnorm_and_fp16_allreduce(backend, sample_dataset, tmp_path):
    sets = ["train.amp=fp16", "train.fp16_allreduce=true", "train.sync_bn=true"]
    run = tmp_path / "run"
    run_hpcgan_mpi(
        2, *train_args(sample_dataset, run, 4, *sets), "--backend", backend, *ON_GPU, check=True, timeout=300
    )
    ckpt = load_ckpt(run)
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["G"].values() if t.is_floating_point())


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


# The script runs in its own process: deterministic mode and cuBLAS's workspace setting are process-wide.
DETERMINISTIC_BACKWARDS = """
import json, os
os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
import torch
from hpcgan.augment import ADA_OPS, ada_augment
torch.use_deterministic_algorithms(True)
refused = []
for op in ADA_OPS:
    x = (torch.rand(4, 2, 32, 32, device="cuda") * 2 - 1).requires_grad_(True)
    try:
        ada_augment(x, 1.0, (op,), image_channels=1).square().sum().backward()
    except RuntimeError as exc:
        assert "deterministic" in str(exc), exc
        refused.append(op)
print(json.dumps(refused))
"""


def test_ada_ops_refused_under_deterministic_mode_are_those_torch_refuses_on_cuda():
    result = run_cmd([sys.executable, "-c", DETERMINISTIC_BACKWARDS], timeout=300, check=True)
    refused = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(refused) == sorted(nondeterministic_ops(ADA_OPS, "cuda", True))


def test_deterministic_ada_trains_on_the_gpu_without_the_refused_ops(sample_dataset, tmp_path):
    sets = [*ADA, "train.deterministic=true", "train.ada_policy=flip,translation,color,cutout"]
    run_hpcgan(*train_args(sample_dataset, tmp_path / "run", 4, *sets), *ON_GPU, check=True, timeout=300)
    refused = run_hpcgan(*train_args(sample_dataset, tmp_path / "no", 4, *ADA, "train.deterministic=true"), *ON_GPU)
    assert refused.returncode == 2 and "train.ada_policy ops scale,rotate" in refused.stderr, refused.stderr


def test_segmentation_task_keeps_its_tensors_on_the_gpu(sample_dataset):
    pairs = load_pairs(sample_dataset)
    cuda = torch.device("cuda", torch.cuda.current_device())
    model = train_segmenter(*pairs["train"], K, RECIPE, device=cuda)
    assert all(p.device == cuda for p in model.parameters())
    assert predict_labels(model, pairs["val"][0]).device == cuda
    on_gpu = task_evaluation(pairs["train"], pairs["noise"], pairs["val"], K, RECIPE, device=cuda)
    on_cpu = task_evaluation(pairs["train"], pairs["noise"], pairs["val"], K, RECIPE)
    # cuDNN's convolutions round otherwise than the CPU's, and Adam amplifies it over the steps.
    assert abs(on_gpu["arms"]["real"]["mean_dice"] - on_cpu["arms"]["real"]["mean_dice"]) < 0.05, (on_gpu, on_cpu)


def test_joint_model_with_ada_samples_and_segmentation_task_on_the_gpu(sample_data, tmp_path):
    data, run, samples = tmp_path / "tissue", tmp_path / "run", tmp_path / "samples"
    preprocess(sample_data, data, *TISSUE).check_returncode()
    args = train_args(data, run, 6, *JOINT_MODEL, *ADA, config="dcgan-64")
    run_hpcgan(*args, *ON_GPU, check=True, timeout=300)
    assert load_ckpt(run)["ada"] is not None
    sample = ["sample", "--checkpoint", run, "--out", samples, "--stack-size", "32", *ON_GPU]
    run_hpcgan(*sample, check=True, timeout=300)
    out = tmp_path / "evaluation.json"
    task = ["--metrics", "swd", "--task", "segmentation", "--budget", "10", *ON_GPU]
    run_hpcgan("evaluate", "--data", data, "--samples", samples, "--out", out, *task, check=True, timeout=600)
    arms = json.loads(out.read_text())["metrics"]["segmentation"]["arms"]
    assert all(arms[arm]["mean_dice"] is not None for arm in ("real", "synthetic", "real+synthetic")), arms
