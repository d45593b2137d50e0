"""ADA (hpcgan.augment, train.ada_*): the ops are differentiable and keep joint mode's image and mask
channels aligned; p follows Karras et al.'s rule (up when D overfits, down below the target); p is the same
on 2 ranks and moves by the r_t of all of them; a run interrupted and resumed with ADA equals an
uninterrupted one, p and the half-counted interval included; a checkpoint without ADA resumes with p = 0."""

import json

import pytest
import torch

from conftest import requires_mpirun, run_hpcgan_mpi
from hpcgan.augment import ADA_OPS, AdaptiveAugment, ada_adjust, ada_augment, diff_augment, nondeterministic_ops
from hpcgan.config import build
from hpcgan.errors import UsageError
from hpcgan.training.checks import check_deterministic, load_train_config
from hpcgan.training.config import TrainConfig
from test_resume import differences, metrics_lines
from test_train import load_ckpt, train_args

GEOMETRIC = ("flip", "translation", "rotate", "scale", "cutout")


def image_and_mask_copy(n=8, side=16, seed=0):
    """(N, 2, H, W): a random image channel and a 'mask' channel that is a copy of it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, side, side, generator=g) * 2 - 1
    return torch.cat([x, x.clone()], dim=1).requires_grad_(True)


def cli_args(*args) -> list:
    return [str(a) for a in args]


def read_metrics(run_dir) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the ops ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", GEOMETRIC)
def test_geometric_ops_move_image_and_mask_alike_and_are_differentiable(op):
    torch.manual_seed(1)
    x = image_and_mask_copy()
    y = ada_augment(x, 1.0, (op,), image_channels=1)
    assert not torch.equal(y[:, 0], x[:, 0])  # it did something...
    assert torch.equal(y[:, 0], y[:, 1])  # ...to both channels alike
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_color_touches_only_the_image_channels():
    x = image_and_mask_copy()
    torch.manual_seed(2)
    y = ada_augment(x, 1.0, ("color",), image_channels=1)
    assert torch.equal(y[:, 1], x[:, 1]) and not torch.equal(y[:, 0], x[:, 0])
    (grad,) = torch.autograd.grad(y[:, 0].sum(), x)
    assert grad[:, 0].abs().sum() > 0
    z = diff_augment(x, "color", image_channels=1)  # DiffAugment's colour alike
    assert torch.equal(z[:, 1], x[:, 1]) and not torch.equal(z[:, 0], x[:, 0])


def test_diff_augment_with_image_channels_is_unchanged_without_a_mask():
    """Passing model.channels (what GanSteps does) changes nothing on image-only tensors: same numbers,
    same random draws, so runs without joint mode are as before."""
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(3)
    a = diff_augment(x, "translation,cutout,color")
    after_a = torch.rand(1)
    torch.manual_seed(3)
    b = diff_augment(x, "translation,cutout,color", image_channels=1)
    assert torch.equal(a, b) and torch.equal(after_a, torch.rand(1))


def test_flip_is_left_right_only_and_p_zero_is_the_identity():
    x = image_and_mask_copy(n=64).detach()
    torch.manual_seed(4)
    y = ada_augment(x, 1.0, ("flip",))
    flipped = [not torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(torch.equal(y[i], x[i].flip(-1)) for i in range(len(x)) if flipped[i])
    assert 0 < sum(flipped) < len(x)  # p/2: executed with probability p, then a coin toss
    state = torch.get_rng_state()
    assert ada_augment(x, 0.0, ADA_OPS) is x and torch.equal(state, torch.get_rng_state())


def brain_like(n=32, side=64):
    """MRI-like slices: background -1 (as in preprocessed images), a bright square in the middle."""
    x = torch.full((n, 1, side, side), -1.0)
    x[:, :, 24:40, 24:40] = 1.0
    return x


def test_rotate_and_scale_are_small():
    """Small, MRI-sized changes: most of the image survives (with p=1 every image is resampled)."""
    torch.manual_seed(5)
    x = brain_like()
    y = ada_augment(x, 1.0, ("rotate", "scale"))
    inside = (x > 0).float()
    overlap = ((y > 0).float() * inside).sum(dim=(1, 2, 3)) / inside.sum(dim=(1, 2, 3))
    assert overlap.min() > 0.6


@pytest.mark.parametrize("ops", [("translation",), ("rotate",), ("scale",), ("rotate", "scale")])
def test_geometric_ops_fill_the_border_with_background_not_zeros(ops):
    """Reflection padding: what comes in at the edges is the -1 background, nowhere the 0 (mid-grey) of
    zero padding, which rotating, zooming out or shifting would draw as a frame."""
    torch.manual_seed(6)
    x = brain_like()
    y = ada_augment(x, 1.0, ops)
    ring = torch.ones(64, 64, dtype=torch.bool)
    ring[8:-8, 8:-8] = False  # 8 pixels at each edge: the largest shift, outside the square however it moves
    assert not torch.equal(y, x)
    torch.testing.assert_close(y[:, :, ring], torch.full_like(y[:, :, ring], -1.0), atol=1e-5, rtol=0)


def test_deterministic_mode_refuses_grid_sample_ops_on_cuda_only(cli_in_process, sample_dataset, tmp_path, capsys):
    """torch.use_deterministic_algorithms raises in grid_sample's CUDA backward (rotate, scale): the rule
    as a function of (device type, deterministic, ops), refused at start-up with one line (exit 2)."""
    assert nondeterministic_ops(ADA_OPS, "cuda", True) == ("scale", "rotate")
    assert nondeterministic_ops(ADA_OPS, "cpu", True) == () and nondeterministic_ops(ADA_OPS, "cuda", False) == ()
    assert nondeterministic_ops(("flip", "translation", "color", "cutout"), "cuda", True) == ()
    on = ["train.ada_target=0.6", "train.deterministic=true"]
    check_deterministic(load_train_config("dcgan-64", on), "cpu", "dcgan-64")  # CPU: deterministic as it is
    check_deterministic(load_train_config("dcgan-64", on[:1]), "cuda", "dcgan-64")
    check_deterministic(load_train_config("dcgan-64", [*on, "train.ada_policy=flip,color"]), "cuda", "dcgan-64")
    with pytest.raises(UsageError, match=r"train\.ada_policy ops scale,rotate"):
        check_deterministic(load_train_config("dcgan-64", [*on, "train.ada_policy=rotate,scale"]), "cuda", "c")
    # The command refuses before anything starts (no GPU needed: the check comes before the device).
    args = train_args(sample_dataset, tmp_path / "run", 2, *on, config="dcgan-64")
    assert cli_in_process(cli_args(*args, "--device", "cuda")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train.deterministic=true on CUDA cannot run train.ada_policy ops" in lines[0], lines
    assert not (tmp_path / "run").exists()


# --- the update rule -------------------------------------------------------------------------------------
def test_p_rises_above_the_target_falls_below_it_and_stays_in_range():
    assert ada_adjust(0.5, 0.9, 0.6, images=16, speed_images=160) == pytest.approx(0.6)
    assert ada_adjust(0.5, 0.2, 0.6, images=16, speed_images=160) == pytest.approx(0.4)
    assert ada_adjust(0.5, 0.6, 0.6, images=16, speed_images=160) == 0.5
    assert ada_adjust(0.05, -1.0, 0.6, images=16, speed_images=160) == 0.0
    assert ada_adjust(0.75, 1.0, 0.6, images=16, speed_images=160, p_max=0.8) == 0.8
    assert ada_adjust(0.5, float("nan"), 0.6, images=16, speed_images=160) == 0.5
    ada = AdaptiveAugment("translation", target=0.6, interval=2, speed_images=100)
    ada.p = 0.5
    ada.observe(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    ada.observe(torch.tensor([-1.0, -1.0, 1.0, -1.0]))  # r_t = -0.25 < 0.6: D does not overfit
    assert ada.adjust(*ada.local_totals()) == -0.25
    assert ada.p == pytest.approx(0.42) and ada.local_totals() == (0.0, 0)


@pytest.mark.parametrize(
    "sets, needle",
    [
        ({"ada_target": 0.6, "diffaugment": "translation"}, "mutually exclusive"),
        ({"ada_target": 1.5}, "train.ada_target"),
        ({"ada_target": 0.6, "ada_policy": "translation,vflip"}, "train.ada_policy: unknown op 'vflip'"),
        ({"ada_policy": ""}, "train.ada_policy"),
        ({"ada_interval": 0}, "train.ada_interval"),
        ({"ada_speed_images": 0}, "train.ada_speed_images"),
        ({"ada_p_max": 0}, "train.ada_p_max"),
    ],
)
def test_bad_ada_settings_are_one_line_errors(sets, needle):
    with pytest.raises(UsageError, match=needle) as info:
        build(TrainConfig, sets, "config", "train.")
    assert "\n" not in str(info.value)


# --- training ----------------------------------------------------------------------------------------------
ADA = ["train.ada_target=0.6", "train.ada_interval=4", "train.ada_speed_images=96"]


def test_p_rises_when_D_overfits(cli_in_process, sample_dataset, tmp_path):
    """48 slices, a BCE discriminator: D soon scores every real image positive (r_t -> 1 > 0.6), and p
    climbs by 16/96 per update of 4 steps of 4 images."""
    run = tmp_path / "run"
    args = train_args(sample_dataset, run, 24, *ADA, config="dcgan-64")
    assert cli_in_process(cli_args(*args)) == 0
    lines = read_metrics(run)
    p, r_t = [line["aug_p"] for line in lines], [line["r_t"] for line in lines]
    assert p[0] == 0.0 and max(p) >= 0.5, p
    assert sum(r > 0.6 for r in r_t) >= len(r_t) - 4, r_t  # D scores (nearly) every real image positive
    assert p == pytest.approx(replayed_p(lines, 4, 0.6, 4, 96), abs=1e-6)  # and p rose by the rule
    assert load_ckpt(run)["ada"]["p"] == pytest.approx(p[-1], abs=1e-6)


def test_a_checkpoint_without_ada_resumes_with_p_zero(cli_in_process, sample_dataset, tmp_path):
    run = tmp_path / "run"
    assert cli_in_process(cli_args(*train_args(sample_dataset, run, 2, "checkpoint.every_steps=2"))) == 0
    assert load_ckpt(run, 2)["ada"] is None
    sets = ["train.ada_target=0.6", "train.ada_interval=4", "train.ada_speed_images=16"]
    assert cli_in_process(cli_args(*train_args(sample_dataset, run, 4, *sets), "--resume", "auto")) == 0
    lines = read_metrics(run)
    assert [line.get("aug_p") for line in lines] == [None, None, 0.0, lines[-1]["aug_p"]]
    # The first update, at step 4, counted the 2 steps since the resume: p moved from 0 by 2 x 4 / 16 or not at all.
    assert lines[-1]["aug_p"] in (0.0, 0.5) and load_ckpt(run, 4)["ada"]["count"] == 0


def replayed_p(lines, interval, target, global_batch, speed_images):
    """p after each logged step, recomputed from the logged r_t (one line per step, the mean over ranks)."""
    p, out, window = 0.0, [], []
    for line in lines:
        window.append(line["r_t"])
        if line["step"] % interval == 0:
            p = ada_adjust(p, sum(window) / len(window), target, global_batch * interval, speed_images)
            window = []
        out.append(p)
    return out


@pytest.mark.mpi
@requires_mpirun
def test_two_ranks_share_p_and_a_resume_is_bit_exact(sample_dataset, tmp_path):
    """WGAN-GP on 2 ranks of 4: p moves by the r_t of both ranks' images (replayed from the log), every
    rank holds the same p (the checkpoint refuses to save otherwise), and 5 steps + resume + 3 steps equal
    8 steps in every checkpoint entry, p and the interval half-counted at step 5 included."""
    interval, target, speed = 2, 0.05, 80
    sets = [
        "checkpoint.every_steps=3",
        "train.ada_target=0.05",
        f"train.ada_interval={interval}",
        f"train.ada_speed_images={speed}",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    run_hpcgan_mpi(2, *train_args(sample_dataset, full, 8, *sets), check=True, timeout=240)
    lines = read_metrics(full)
    p = [line["aug_p"] for line in lines]
    assert max(p) > 0, p
    assert p == pytest.approx(replayed_p(lines, interval, target, 8, speed), abs=1e-6)
    assert load_ckpt(full, 8)["ada"]["p"] == pytest.approx(p[-1], abs=1e-6)

    run_hpcgan_mpi(2, *train_args(sample_dataset, split, 5, *sets), check=True, timeout=240)
    assert load_ckpt(split, 5)["ada"]["count"] == 8  # step 5 is mid-interval: 8 images counted, not yet used
    run_hpcgan_mpi(2, *train_args(sample_dataset, split, 8, *sets), "--resume", "auto", check=True, timeout=240)
    a, b = load_ckpt(full, 8), load_ckpt(split, 8)
    assert differences(a, b) == []
    assert metrics_lines(split) == metrics_lines(full)
