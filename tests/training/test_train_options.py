"""Training options docs/training.md documents, each checked by its effect on short real runs: learning
rates (optim.lr_g, optim.lr_d, optim.scale_lr), time-based checkpoints (checkpoint.every_minutes),
fp16 gradient compression (train.fp16_allreduce), conditional training (train.labels=mask), bf16
mixed precision (train.amp=bf16), and the replica check that ends a job whose ranks' weights drift
apart."""

import json

import numpy as np
import pytest
import torch

from hpcgan.config import build
from hpcgan.models import build_discriminator, build_generator
from hpcgan.models.config import ModelConfig
from hpcgan.generation import generate_images, load_generator
from hpcgan.stacks import read_stack_attrs, read_stack_h5

from conftest import REPO, requires_mpirun, run_hpcgan, run_hpcgan_mpi, run_python_mpi
from test_train import PURE, load_ckpt, train_args

# Learning rates such that 2 x LR_G, LR_G, 2 x lr and lr (the config's optim.lr, 1e-4) all differ, and
# the same for D: the step size seen tells whether lr_g/lr_d and scale_lr were both applied.
LR_G, LR_D = 3e-5, 7e-4
STEPS = 3
# A model without batch statistics or noise (PURE) and one G step per D step, so that runs differ
# only by the option under test.
BASE = [*PURE, "loss.type=hinge", "loss.n_critic=1"]
OPTIONS = [
    *BASE,
    "optim.scale_lr=true",
    f"optim.lr_g={LR_G}",
    f"optim.lr_d={LR_D}",
    "train.labels=mask",
    "model.num_classes=2",
    "checkpoint.every_minutes=0.00001",
    "checkpoint.keep=10",
]


def initial_networks(ckpt):
    """G and D as the training loop builds them before its first step (seeded by train.seed)."""
    cfg = build(ModelConfig, ckpt["config"]["model"], "checkpoint", "model.")
    torch.manual_seed(ckpt["config"]["train"]["seed"])
    return build_generator(cfg), build_discriminator(cfg)


def updates(ckpt):
    """{(network, parameter name): weights in `ckpt` minus the initial weights}."""
    G0, D0 = initial_networks(ckpt)
    return {
        (name, key): ckpt[name][key] - w0.detach()
        for name, net0 in (("G", G0), ("D", D0))
        for key, w0 in net0.named_parameters()
    }


def assert_close_but_not_identical(reference, other, min_agreement):
    """The option changed the arithmetic, not the training: some weight differs from the reference
    run's in some bit, yet (Adam moves each weight by about ±lr per step, so a rounding difference
    can flip the direction of a weight whose gradient is nearly 0) more than `min_agreement` of the
    weights of each network moved in the same direction as in the reference run (measured: 0.8 to
    0.99 for fp16 compression and bf16; 0.5 for a run with another seed)."""
    ref, oth = updates(reference), updates(other)
    assert any(not torch.equal(ref[key], oth[key]) for key in ref)
    for name in ("G", "D"):
        a = torch.cat([update.flatten() for (net, _), update in ref.items() if net == name])
        b = torch.cat([update.flatten() for (net, _), update in oth.items() if net == name])
        agreement = (a.sign() == b.sign())[a != 0].float().mean().item()
        assert agreement > min_agreement, (name, agreement)


@pytest.fixture(scope="module")
def two_rank_runs(sample_dataset, tmp_path_factory):
    """Two 2-rank Horovod runs with every option of OPTIONS, with and without fp16 gradient compression."""
    runs = {}
    for compression in ("false", "true"):
        run = tmp_path_factory.mktemp(f"fp16-allreduce-{compression}") / "run"
        run_hpcgan_mpi(
            2,
            *train_args(sample_dataset, run, STEPS, *OPTIONS, f"train.fp16_allreduce={compression}"),
            "--backend",
            "horovod",
            check=True,
            timeout=240,
        )
        runs[compression] = run
    return runs


@pytest.mark.mpi
@requires_mpirun
def test_scale_lr_and_separate_learning_rates_are_the_step_sizes(two_rank_runs):
    first = load_ckpt(two_rank_runs["false"], step=1)
    assert first["world_size"] == 2
    assert [group["lr"] for group in first["opt_G"]["param_groups"]] == [2 * LR_G]
    assert [group["lr"] for group in first["opt_D"]["param_groups"]] == [2 * LR_D]
    # Adam's first step moves each weight by lr·g/(|g| + eps), i.e. ±lr wherever the gradient is not
    # tiny: the largest move of each network is the learning rate it really used.
    moved = {}
    for (name, _), update in updates(first).items():
        moved[name] = max(moved.get(name, 0.0), update.abs().max().item())
    assert moved["G"] == pytest.approx(2 * LR_G, rel=1e-3) and moved["D"] == pytest.approx(2 * LR_D, rel=1e-3)


@pytest.mark.mpi
@requires_mpirun
def test_every_minutes_writes_checkpoints_by_the_clock(two_rank_runs):
    # checkpoint.every_steps=0: without the clock only the last step would be saved. Every 0.6 ms
    # of wall time is shorter than any step, so each step is due one.
    names = sorted(path.name for path in (two_rank_runs["false"] / "checkpoints").glob("ckpt-*.pt"))
    assert names == [f"ckpt-{step:08d}.pt" for step in range(1, STEPS + 1)]


@pytest.mark.mpi
@requires_mpirun
def test_fp16_allreduce_is_close_to_the_fp32_allreduce_but_not_identical(two_rank_runs):
    plain, compressed = load_ckpt(two_rank_runs["false"]), load_ckpt(two_rank_runs["true"])
    assert (plain["config"]["train"]["fp16_allreduce"], compressed["config"]["train"]["fp16_allreduce"]) == (
        False,
        True,
    )
    assert_close_but_not_identical(plain, compressed, min_agreement=0.75)


@pytest.mark.mpi
@requires_mpirun
def test_mask_labels_train_a_conditional_generator_that_sample_labels_drive(two_rank_runs, tmp_path):
    """Which class a slice gets from its mask is tested in tests/test_data.py; here: both classes train,
    and `hpcgan sample --labels 0,1` cycles them over the images of a stack."""
    run = two_rank_runs["false"]
    first = load_ckpt(run, step=1)
    assert (first["config"]["train"]["labels"], first["config"]["model"]["num_classes"]) == ("mask", 2)
    for (name, key), update in updates(first).items():
        if key == "embed.weight":  # each class's row took Adam's first step (at most lr per element)
            lr = 2 * (LR_G if name == "G" else LR_D)
            assert all(0.1 * lr < moved <= 1.001 * lr for moved in update.abs().amax(dim=1).tolist()), name
    run_hpcgan(
        "sample",
        "--checkpoint",
        run,
        "--out",
        tmp_path / "s",
        "--stack-size",
        6,
        "--format",
        "h5",
        "--labels",
        "0,1",
        "--seed",
        4,
        check=True,
    )
    stack = read_stack_h5(tmp_path / "s" / "stack-00000.h5")
    assert json.loads(read_stack_attrs(tmp_path / "s" / "stack-00000.h5")["labels"]) == [0, 1]
    ckpt = run / "checkpoints" / "ckpt-{:08d}.pt".format(STEPS)
    G = load_generator(ckpt)
    by_class = {c: generate_images(G, range(6), 4, labels=[c]).numpy() for c in (0, 1)}  # the same latents
    assert not np.allclose(by_class[0], by_class[1], rtol=0.05, atol=0)  # the class changes the image
    np.testing.assert_allclose(stack[0::2], by_class[0][0::2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stack[1::2], by_class[1][1::2], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_changes_the_arithmetic_not_the_training(sample_dataset, tmp_path):
    """train.amp=bf16 on a CPU (fp16 and its gradient scalers need CUDA: hpcgan refuses them here)."""
    ckpts = {}
    for amp in ("none", "bf16"):
        run_hpcgan(*train_args(sample_dataset, tmp_path / amp, 2, *BASE, f"train.amp={amp}"), check=True)
        ckpts[amp] = load_ckpt(tmp_path / amp)
    assert_close_but_not_identical(ckpts["none"], ckpts["bf16"], min_agreement=0.75)
    assert ckpts["bf16"]["scaler_G"] is None and ckpts["bf16"]["scaler_D"] is None  # bf16 needs no loss scaling


@pytest.mark.mpi
@requires_mpirun
def test_ranks_whose_weights_drift_apart_end_the_job(sample_dataset, tmp_path):
    run = tmp_path / "run"
    result = run_python_mpi(
        2, REPO / "tests" / "mpi_scripts" / "drifting_rank.py", *train_args(sample_dataset, run, 2), timeout=120
    )
    assert result.returncode != 0
    assert "step 2: the ranks' weights have drifted apart" in result.stderr, result.stderr[-3000:]
    assert not list((run / "checkpoints").glob("ckpt-*.pt"))
