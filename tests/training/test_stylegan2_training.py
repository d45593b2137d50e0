"""StyleGAN2 (`model.arch` and `loss.type` stylegan2) with every guarantee of the loop, on tiny widths: 2 ranks x b
equal 1 process x 2b through lazy R1 and path-length steps on both backends, a resume across a lazy step is bit-exact
(with ADA), a preemption checkpoints and resumes to the uninterrupted result, NaN stops every rank; a joint model
samples with truncation (HDF5, NIfTI, PNG with masks), evaluates and reports like every family."""

import json
import signal
import subprocess

import h5py
import pytest
import torch
from conftest import hpcgan_cmd, kill_job, mpi_env, mpirun_cmd, requires_mpirun, run_hpcgan, run_hpcgan_mpi
from test_nonfinite import error_lines, poisoned_copy
from test_resume import EXIT_REQUEUE, differences, metrics_lines, train_in_one_go_and_resumed
from test_train import _wait_for_rank, assert_two_ranks_trained_like_one, load_ckpt

from hpcgan.errors import EXIT_NONFINITE

# The gradient of a noise strength (or of a weight whose gradient nearly cancels) is a sum over every pixel of
# its layer: its order of summation differs between one batch of 2b and two of b, by a few 1e-4 relative, and
# Adam with beta1 = 0 turns it into up to a few % of one step for a handful of elements. With lr 5e-4 (in
# TINY_STYLE) the largest difference measured is 1.4e-6; a wrong step (a rank's gradient left out, a lazy
# step on one rank, other noise or mixing) moves elements by up to a whole step, 5e-4 (noise drawn per
# rank instead of per global sample: 1.7e-3).
STYLE_TOLERANCE = dict(rtol=1e-3, atol=1e-5)
# Widths 32..4 at 64x64, a 2-layer mapping: a step takes tens of milliseconds. R1 every 2 steps, the path
# length every 3, so that a few steps hold both lazy kinds (steps 0, 2, 4 and 0, 3).
TINY_STYLE = [
    "model.channel_base=256",
    "model.channel_max=32",
    "model.latent_dim=16",
    "model.mapping_layers=2",
    "loss.r1_interval=2",
    "loss.pl_interval=3",
    "train.batch_size=4",
    "optim.lr=0.0005",
    "train.ema_kimg=0.1",
    "log.every_steps=1",
    "log.sample_every_steps=0",
    "log.tensorboard=false",
    "checkpoint.every_steps=0",
]


def style_args(dataset, out, steps, *sets):
    args = ["train", "--config", "stylegan2-64", "--data", dataset, "--out", out, "--set", f"train.steps={steps}"]
    for s in [*TINY_STYLE, *sets]:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def one_process(sample_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("stylegan2-one") / "run"
    run_hpcgan(*style_args(sample_dataset, run, 5, "train.batch_size=8"), check=True, timeout=240)
    return run


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_ranks_equal_one_process_with_twice_the_batch_through_lazy_steps(
    one_process, sample_dataset, tmp_path, backend
):
    two = tmp_path / "two"
    result = run_hpcgan_mpi(2, *style_args(sample_dataset, two, 5), "--backend", backend, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backward_passes_per_step" not in result.stderr  # Horovod's warning of a second backward
    assert_two_ranks_trained_like_one(one_process, two, **STYLE_TOLERANCE)
    a, b = load_ckpt(one_process), load_ckpt(two)
    for key in a["G_ema"]:  # G-EMA, w_avg (the mean of the ranks' running means) and the noise buffers
        torch.testing.assert_close(b["G_ema"][key], a["G_ema"][key], rtol=1e-4, atol=2e-5, msg=key)
    assert a["pl_mean"] > 0 and float(b["pl_mean"]) == pytest.approx(float(a["pl_mean"]), rel=1e-4)
    lines = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    lines_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    # The lazy steps happened where their intervals say, on one process and on both ranks alike.
    assert [("r1" in line, "pl_length" in line) for line in lines] == [
        (True, True),
        (False, False),
        (True, False),
        (False, True),
        (True, False),
    ]
    for key in ("loss_d", "loss_g", "r1", "pl_length", "pl_penalty"):
        values, values_two = ([line[key] for line in ls if key in line] for ls in (lines, lines_two))
        assert values and values_two == pytest.approx(values, rel=1e-4), key


@pytest.mark.mpi
@requires_mpirun
def test_resume_across_a_lazy_step_is_bit_exact_with_ada(sample_dataset, tmp_path):
    sets = ["loss.pl_interval=2", "checkpoint.every_steps=3", "train.ada_target=0.1", "train.ada_interval=1"]
    sets += ["optim.lr=0.0025"]  # the config's: D learns fast enough for ADA to move p within 6 steps
    # Steps 3-5 after the resume hold R1 and path-length steps (4) and ADA moves p at every step.
    full, split = train_in_one_go_and_resumed(style_args, sample_dataset, tmp_path, 6, 3, sets)
    a, b = load_ckpt(full, 6), load_ckpt(split, 6)
    assert differences(a, b) == []
    assert a["ada"]["p"] > 0 and a["pl_mean"] > 0
    assert metrics_lines(split) == metrics_lines(full)


@pytest.mark.mpi
@requires_mpirun
def test_preemption_checkpoints_and_resumes_to_the_uninterrupted_run(sample_dataset, tmp_path):
    run = tmp_path / "run"
    cmd = mpirun_cmd(2) + hpcgan_cmd(*style_args(sample_dataset, run, 100000), "--backend", "torch")
    proc = subprocess.Popen(
        cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_for_rank(proc, 1, run).send_signal(signal.SIGUSR1)  # only rank 1 hears it
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_job(proc.pid)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    k = load_ckpt(run)["step"]
    common = ("--backend", "torch")
    run_hpcgan_mpi(2, *style_args(sample_dataset, run, k + 3), *common, "--resume", "auto", check=True, timeout=240)
    reference = tmp_path / "reference"
    run_hpcgan_mpi(2, *style_args(sample_dataset, reference, k + 3), *common, check=True, timeout=240)
    assert differences(load_ckpt(run), load_ckpt(reference)) == []
    assert metrics_lines(run) == metrics_lines(reference)


@pytest.mark.mpi
@requires_mpirun
def test_nan_on_one_rank_stops_every_rank(sample_dataset, tmp_path):
    dataset = poisoned_copy(sample_dataset, tmp_path, batches=[1])  # rank 1's data of step 2
    result = run_hpcgan_mpi(2, *style_args(dataset, tmp_path / "run", 4), timeout=240)
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    lines = error_lines(result.stderr, "step 2:")
    assert len(lines) == 1 and "loss_d is nan on rank 1" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.mpi
@requires_mpirun
def test_a_joint_model_samples_with_truncation_evaluates_and_reports(tissue_dataset, tmp_path):
    run = tmp_path / "run"
    sets = ["model.mask_classes=3", "eval.every_steps=4", "eval.metrics=[swd,memorization]", "eval.num_images=16"]
    run_hpcgan_mpi(2, *style_args(tissue_dataset, run, 4, *sets), check=True, timeout=240)
    samples = {}
    for psi in ("1", "0.7", "0"):
        out = tmp_path / f"psi{psi}"
        args = ["--checkpoint", run, "--out", out, "--stack-size", "8", "--truncation", psi]
        run_hpcgan("sample", *args, *(["--format", "h5"] if psi != "0.7" else []), check=True)
        with h5py.File(out / "stack-00000.h5") as f:
            samples[psi] = (torch.from_numpy(f["images"][:]), f["masks"][:])
        assert json.loads((out / "index.json").read_text())["truncation"] == float(psi)
    files = sorted(p.name for p in (tmp_path / "psi0.7").iterdir())
    assert files == [
        "index.json",
        "stack-00000-mask.nii.gz",
        "stack-00000.h5",
        "stack-00000.nii.gz",
        "stack-00000.png",
    ]
    images = {psi: x for psi, (x, _) in samples.items()}
    assert torch.allclose(images["0"], images["0"][:1].expand_as(images["0"]))  # every w is the mean w
    spread = {psi: (x - x.mean(0)).square().mean().item() for psi, x in images.items()}
    assert spread["0"] < 1e-10 < spread["0.7"] < spread["1"]
    assert samples["1"][1].shape == (8, 64, 64) and samples["1"][1].max() <= 2
    bad = run_hpcgan("sample", "--checkpoint", run, "--out", tmp_path / "bad", "--truncation", "1.5")
    assert bad.returncode == 2 and "--truncation: must be in [0, 1]" in bad.stderr and not (tmp_path / "bad").exists()
    result = run_hpcgan(
        "evaluate", "--data", tissue_dataset, "--samples", tmp_path / "psi1", "--out", run / "evaluation.json"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "evaluation.json").read_text())["metrics"]["swd"]["value"] > 0
    report = run_hpcgan("report", run, "--samples", tmp_path / "psi1", check=True)
    assert "stylegan2" in (run / "report.html").read_text() and report.returncode == 0
