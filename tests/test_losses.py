"""GAN losses (hpcgan/losses.py) and DiffAugment (hpcgan/augment.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcgan.augment import diff_augment
from hpcgan.config import build
from hpcgan.errors import UsageError
from hpcgan.losses import LossConfig, check_loss_model, clip_weights_, d_loss, g_loss, gradient_penalty
from hpcgan.models import build_discriminator
from hpcgan.models.config import ModelConfig


# ---------------------------------------------------------------- each loss learns a known distribution

RING_MODES, RING_RADIUS, RING_STD = 8, 2.0, 0.05


def ring_centres():
    angle = torch.arange(RING_MODES) * (2 * math.pi / RING_MODES)
    return RING_RADIUS * torch.stack([angle.cos(), angle.sin()], 1)


def ring_of_gaussians(n, generator=None):
    """8 Gaussians (std 0.05) on a circle of radius 2: the usual mode-coverage toy (Metz et al. 2017)."""
    mode = torch.randint(0, RING_MODES, (n,), generator=generator)
    return ring_centres()[mode] + RING_STD * torch.randn(n, 2, generator=generator)


def recovered_modes(samples, min_share=0.005):
    """Modes holding at least `min_share` of the samples within 3 std of their centre ("high-quality"
    samples, as Metz et al. 2017 and Srivastava et al. 2017 count them)."""
    distance, nearest = torch.cdist(samples, ring_centres()).min(dim=1)
    counts = torch.bincount(nearest[distance < 3 * RING_STD], minlength=RING_MODES)
    return int((counts >= min_share * len(samples)).sum())


def sliced_wasserstein(a, b, seed=2, projections=128):
    """Mean over random directions of the 1-D Wasserstein-1 distance of the projections."""
    dirs = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed))
    dirs = dirs / dirs.norm(dim=0)
    pa, _ = (a @ dirs).sort(0)
    pb, _ = (b @ dirs).sort(0)
    return (pa - pb).abs().mean().item()


def mlp(n_in, n_out):
    return nn.Sequential(
        nn.Linear(n_in, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, n_out)
    )


def train_toy_gan(cfg, steps, lr, batch):
    """Train a tiny MLP GAN exactly as the training loop uses the losses; SWD to the target before
    and after training, and 2000 samples of the trained generator."""
    torch.manual_seed(0)
    G, D_net = mlp(8, 2), mlp(2, 1)
    D = lambda x, labels=None: D_net(x).squeeze(1)  # noqa: E731  (any callable (x, labels) -> scores)
    opt_G = torch.optim.Adam(G.parameters(), lr, betas=(0.5, 0.9))
    opt_D = torch.optim.Adam(D_net.parameters(), lr, betas=(0.5, 0.9))
    held_out = torch.Generator().manual_seed(1)
    target, z_eval = ring_of_gaussians(2000, held_out), torch.randn(2000, 8, generator=held_out)
    with torch.no_grad():
        before = sliced_wasserstein(G(z_eval), target)
    for step in range(steps):
        loss, _ = d_loss(cfg, D, ring_of_gaussians(batch), G(torch.randn(batch, 8)))
        opt_D.zero_grad()
        loss.backward()
        opt_D.step()
        if cfg.type == "wgan":
            clip_weights_(D_net, cfg.clip_value)
        if (step + 1) % cfg.n_critic == 0:
            D_net.requires_grad_(False)
            loss, _ = g_loss(cfg, D, G(torch.randn(batch, 8)))
            opt_G.zero_grad()
            loss.backward()
            opt_G.step()
            D_net.requires_grad_(True)
    with torch.no_grad():
        samples = G(z_eval)
    return before, sliced_wasserstein(samples, target), samples


@pytest.mark.parametrize(
    "cfg, steps, lr, batch, resolves_modes",
    [
        (LossConfig(type="bce"), 600, 1e-3, 512, True),
        (LossConfig(type="bce", label_smoothing=0.1), 600, 1e-3, 512, True),
        (LossConfig(type="lsgan"), 600, 1e-3, 512, True),
        (LossConfig(type="hinge"), 600, 1e-3, 512, True),
        # The Wasserstein family wants several critic steps per G step (as in their papers); the clip
        # value scales with this critic's width, and WGAN-GP oscillates at larger learning rates. In a
        # budget of seconds they move the samples towards the ring but resolve none of its modes (the
        # papers train for 10^4-10^5 steps), so for them only the distance is checked.
        (LossConfig(type="wgan", n_critic=5, clip_value=0.05), 500, 1e-3, 128, False),
        (LossConfig(type="wgan-gp", n_critic=5), 3000, 1e-4, 128, False),
    ],
    ids=["bce", "bce-smoothed", "lsgan", "hinge", "wgan", "wgan-gp"],
)
def test_each_loss_learns_a_ring_of_gaussians(cfg, steps, lr, batch, resolves_modes):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    try:
        before, after, samples = train_toy_gan(cfg, steps, lr, batch)
    finally:
        torch.set_num_threads(threads)
    assert after < 0.6 * before, (before, after)
    if resolves_modes:
        assert recovered_modes(samples) == RING_MODES  # every mode of the ring, none dropped


def test_recovered_modes_counts_a_collapsed_and_a_complete_ring():
    generator = torch.Generator().manual_seed(3)
    complete = ring_of_gaussians(2000, generator)
    assert recovered_modes(complete) == RING_MODES
    assert recovered_modes(complete[(torch.cdist(complete, ring_centres()).argmin(1) < 3)]) == 3
    assert recovered_modes(0.3 * complete) == 0  # a ring of the wrong radius is no mode at all


# ---------------------------------------------------------------- gradient penalty


def small_critic():
    cfg = ModelConfig(resolution=32, channels=1, d_base_width=4, max_width=8, d_norm="layer")
    torch.manual_seed(3)
    return build_discriminator(cfg).double()


def test_gradient_penalty_matches_finite_differences():
    D = small_critic()
    real, fake = torch.randn(2, 1, 32, 32, dtype=torch.float64), torch.randn(2, 1, 32, 32, dtype=torch.float64)
    torch.manual_seed(5)
    gp = gradient_penalty(D, real, fake)
    torch.manual_seed(5)  # the penalty draws its per-sample epsilon first
    eps = torch.rand(2, 1, 1, 1, dtype=torch.float64)
    x_hat = eps * real + (1 - eps) * fake
    h, norms = 1e-6, []
    basis = torch.eye(32 * 32, dtype=torch.float64).view(-1, 1, 32, 32)
    with torch.no_grad():
        for i in range(2):  # central differences along every pixel, one sample at a time
            grad = (D(x_hat[i : i + 1] + h * basis) - D(x_hat[i : i + 1] - h * basis)) / (2 * h)
            norms.append(grad.norm())
    expected = ((torch.stack(norms) - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-6)
    assert gp.item() > 0.01  # a non-trivial value: the norms are far from 1 at init


def test_gradient_penalty_is_float32_under_autocast_and_reaches_the_weights():
    D = small_critic().float()
    real, fake = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    torch.manual_seed(7)
    plain = gradient_penalty(D, real, fake)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = gradient_penalty(D, real.bfloat16(), fake.bfloat16())
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(plain.item(), rel=0.02)  # only the bf16 inputs differ
    autocast.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters() if p.dim() > 1)


def test_wgan_gp_d_loss_includes_the_weighted_penalty():
    D = small_critic().float()
    real, fake = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    torch.manual_seed(1)
    loss, stats = d_loss(LossConfig(type="wgan-gp", gp_weight=10.0), D, real, fake)
    expected = D(fake).mean() - D(real).mean() + 10.0 * stats["gp"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["wdist"].item() == pytest.approx((D(real).mean() - D(fake).mean()).item(), rel=1e-5)


# ---------------------------------------------------------------- loss values, label smoothing, clipping


def constant_critic(real_score, fake_score):
    """Scores real (>0 inputs) and fake (<0 inputs) with fixed values."""
    return lambda x, labels=None: torch.where(x.flatten(1).mean(1) > 0, real_score, fake_score)


REAL, FAKE = torch.ones(4, 1, 2, 2), -torch.ones(4, 1, 2, 2)


def test_label_smoothing_moves_the_real_target():
    D = constant_critic(torch.tensor(0.7), torch.tensor(-0.4))
    r, f = torch.tensor([0.7]), torch.tensor([-0.4])
    for s in (0.0, 0.2):
        bce, _ = d_loss(LossConfig(type="bce", label_smoothing=s), D, REAL, FAKE)
        assert bce.item() == pytest.approx(
            (
                F.binary_cross_entropy_with_logits(r, torch.tensor([1 - s]))
                + F.binary_cross_entropy_with_logits(f, torch.zeros(1))
            ).item()
        )
        ls, _ = d_loss(LossConfig(type="lsgan", label_smoothing=s), D, REAL, FAKE)
        assert ls.item() == pytest.approx(0.5 * (0.7 - (1 - s)) ** 2 + 0.5 * 0.4**2)
    smoothed = d_loss(LossConfig(type="bce", label_smoothing=0.2), D, REAL, FAKE)[0]
    assert smoothed.item() != pytest.approx(d_loss(LossConfig(type="bce"), D, REAL, FAKE)[0].item())
    # One-sided: the generator's target stays 1.
    assert g_loss(LossConfig(type="bce", label_smoothing=0.2), D, FAKE)[0].item() == pytest.approx(
        F.softplus(torch.tensor(0.4)).item()
    )


def test_loss_values_on_known_scores():
    D = constant_critic(torch.tensor(0.5), torch.tensor(-2.0))
    values = {t: d_loss(LossConfig(type=t), D, REAL, FAKE)[0].item() for t in ("hinge", "wgan")}
    assert values["hinge"] == pytest.approx(0.5 + 0.0)  # relu(1 - 0.5) + relu(1 - 2)
    assert values["wgan"] == pytest.approx(-2.0 - 0.5)
    assert g_loss(LossConfig(type="hinge"), D, FAKE)[0].item() == pytest.approx(2.0)
    assert g_loss(LossConfig(type="lsgan"), D, FAKE)[0].item() == pytest.approx(0.5 * 9.0)


def test_d_loss_detaches_fakes():
    G = nn.Linear(4, 4)
    D_net = nn.Linear(4, 1)
    fake = G(torch.randn(3, 4))
    loss, _ = d_loss(LossConfig(type="hinge"), lambda x, labels=None: D_net(x).squeeze(1), torch.randn(3, 4), fake)
    loss.backward()
    assert G.weight.grad is None and D_net.weight.grad is not None


def test_clip_weights_clamps_every_parameter():
    D = build_discriminator(ModelConfig(resolution=32, d_base_width=4, max_width=8))
    with torch.no_grad():
        for p in D.parameters():
            p.mul_(100)
    clip_weights_(D, 0.01)
    assert max(p.abs().max().item() for p in D.parameters()) == pytest.approx(0.01)


def test_wgan_gp_refuses_a_batch_norm_critic():
    with pytest.raises(ValueError, match="model.d_norm: WGAN-GP needs a critic without batch norm"):
        check_loss_model(LossConfig(type="wgan-gp"), ModelConfig(d_norm="batch"))
    check_loss_model(LossConfig(type="wgan-gp"), ModelConfig(d_norm="layer"))
    check_loss_model(LossConfig(type="wgan"), ModelConfig(d_norm="batch"))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"type": "wgan-div"}, "loss.type"),
        ({"n_critic": 0}, "loss.n_critic: must be >= 1"),
        ({"label_smoothing": 1.0}, "loss.label_smoothing"),
        ({"type": "hinge", "label_smoothing": 0.1}, "loss.label_smoothing: only bce and lsgan"),
        ({"clip_value": 0}, "loss.clip_value"),
    ],
)
def test_bad_loss_config_names_the_key(data, message):
    with pytest.raises(UsageError, match=message):
        build(LossConfig, data, "x.yaml", "loss.")


# ---------------------------------------------------------------- DiffAugment


def test_diff_augment_empty_policy_is_identity():
    x = torch.randn(2, 1, 16, 16)
    assert diff_augment(x, "") is x
    assert diff_augment(x, " , ") is x


@pytest.mark.parametrize("policy", ["translation", "cutout", "color", "color,translation,cutout"])
def test_diff_augment_shapes_gradients_and_seed(policy):
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    torch.manual_seed(0)
    y = diff_augment(x, policy)
    assert y.shape == x.shape and not torch.equal(y, x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.manual_seed(0)
    assert torch.equal(diff_augment(x, policy), y)  # reproducible under a seed


def test_translation_shifts_content():
    n, side = 64, 32
    x = torch.zeros(n, 1, side, side)
    x[:, :, 10, 20] = 1.0  # one bright pixel, well inside the image
    torch.manual_seed(0)
    y = diff_augment(x, "translation")
    shifts = set()
    for img in y[:, 0]:
        assert img.sum() == 1 and img.max() == 1  # moved, not blurred or lost
        row, col = divmod(int(img.argmax()), side)
        dy, dx = row - 10, col - 20
        assert abs(dy) <= 4 and abs(dx) <= 4  # 1/8 of the side
        shifts.add((dy, dx))
    assert len(shifts) > 20  # 81 possible shifts, drawn per sample


def test_cutout_zeroes_a_square_of_half_the_side():
    x = torch.ones(32, 1, 16, 16)
    torch.manual_seed(0)
    y = diff_augment(x, "cutout")
    zeros = (y == 0).sum(dim=(1, 2, 3))
    assert (zeros > 0).all() and (zeros <= 64).all() and (zeros == 64).any()


def test_color_changes_brightness_and_contrast_per_sample():
    x = torch.linspace(-1, 1, 16 * 16).view(1, 1, 16, 16).repeat(8, 1, 1, 1)
    torch.manual_seed(0)
    y = diff_augment(x, "color")
    assert len(set(y.mean(dim=(1, 2, 3)).tolist())) == 8
    assert len(set(y.std(dim=(1, 2, 3)).tolist())) == 8


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy 'saturation'"):
        diff_augment(torch.zeros(1, 1, 8, 8), "translation,saturation")
