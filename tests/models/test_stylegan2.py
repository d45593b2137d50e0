"""StyleGAN2's networks (hpcgan/models/stylegan2.py) and recipe pieces: known answers of its layers (demodulation,
equalised learning rate, the low-pass filter, noise, truncation, minibatch std), its config rules, the lazy
correction and the EMA half-life, and the layer summary every run prints."""

import math

import pytest
import torch
import torch.nn.functional as F

from hpcgan.config import build
from hpcgan.errors import UsageError
from hpcgan.losses import LossConfig, lazy_ratio, path_lengths, r1_penalty
from hpcgan.models import build_discriminator, build_generator, layer_summary
from hpcgan.models.config import ModelConfig
from hpcgan.models.stylegan2 import EqualLinear, LowPass, ModulatedConv, minibatch_std, num_ws, widths
from hpcgan.training.checks import load_train_config
from hpcgan.training.config import TrainConfig
from hpcgan.training.steps import ema_decay


def tiny(**kw):
    base = dict(arch="stylegan2", resolution=32, latent_dim=16, channel_base=128, channel_max=16, mapping_layers=2)
    return ModelConfig(**{**base, **kw})


def test_demodulated_conv_keeps_unit_variance_and_modulation_scales_only_before_it():
    torch.manual_seed(0)
    conv = ModulatedConv(64, 64, 16, 32)
    x = torch.randn(8, 64, 32, 32)
    w = torch.randn(8, 16)
    with torch.no_grad():
        y = conv(x, w)  # noise strength 0, bias 0: lrelu(demodulated conv) * sqrt(2)
        pre = y / math.sqrt(2)
        inner = pre[:, :, 1:-1, 1:-1]  # zero padding lowers the border's variance
        # leaky ReLU(0.2) of a unit normal has second moment (1 + 0.2^2) / 2; x sqrt 2 makes it ~1.04
        assert (y[:, :, 1:-1, 1:-1].square().mean() / (1 + 0.2**2)).item() == pytest.approx(1.0, abs=0.05)
        # demodulation: the same output whatever the scale of the style
        conv.affine.bias.mul_(10)
        assert torch.allclose(conv(x, w * 10), y, atol=1e-4)
    assert inner.shape[-1] == 30


def test_equalised_learning_rate_scales_weights_at_run_time():
    torch.manual_seed(0)
    layer = EqualLinear(256, 128, lr_mul=0.01)
    assert layer.weight.std().item() == pytest.approx(100, rel=0.05)  # stored N(0, 1 / lr_mul)
    x = torch.randn(512, 256, requires_grad=True)
    y = layer(x)
    assert y.std().item() == pytest.approx(1.0, rel=0.05)  # effective weight N(0, 1 / fan_in)
    y.sum().backward()
    expected = layer.weight_gain * (torch.ones(512, 128).T @ x.detach())
    assert torch.allclose(layer.weight.grad, expected, rtol=1e-4, atol=1e-5)
    assert layer.weight_gain == pytest.approx(0.01 / 16)


def test_lowpass_up_is_bilinear_inside_and_down_keeps_a_constant():
    x = torch.randn(2, 3, 8, 8)
    up = LowPass().up(x)
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert up.shape == (2, 3, 16, 16)
    assert torch.allclose(up[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1], atol=1e-6)  # borders: zeros, not clamp
    down = LowPass().down(torch.ones(1, 2, 8, 8))
    assert down.shape == (1, 2, 4, 4) and torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


def test_noise_strength_zero_is_deterministic_and_noise_moves_the_image_otherwise():
    torch.manual_seed(0)
    G = build_generator(tiny())
    ws = G.mapping(torch.randn(4, 16))
    noises = [[torch.randn(4, 1, s, s) for s in G.synthesis.noise_sides()] for _ in range(2)]
    with torch.no_grad():
        a, b = G.render(ws, noises[0]), G.render(ws, noises[1])
        assert torch.equal(a, b)  # strengths start at 0
        for conv in G.synthesis.convs:
            conv.noise_strength.fill_(0.5)
        a, b = G.render(ws, noises[0]), G.render(ws, noises[1])
        assert not torch.allclose(a, b)
        assert torch.equal(G.render(ws), G.render(ws))  # without noise: the fixed buffers


def test_truncation_pulls_every_image_towards_the_mean_w():
    torch.manual_seed(0)
    G = build_generator(tiny()).eval()
    z = torch.randn(6, 16)
    with torch.no_grad():
        G.mapping(torch.randn(64, 16), update_w_avg=True)
        assert G.mapping.w_avg.abs().sum() > 0
        free = G(z)
        G.truncation = 0.0
        mean_image = G(z)
        G.truncation = 0.7
        truncated = G(z)
    assert torch.allclose(mean_image, mean_image[:1].expand_as(mean_image), atol=1e-6)  # psi 0: w_avg for all
    assert not torch.allclose(truncated, free)
    spread = [(x - x.mean(0)).square().mean().item() for x in (free, truncated)]
    assert spread[1] < spread[0]


def test_minibatch_std_groups_consecutive_samples_so_a_split_batch_gives_the_same():
    x = torch.randn(8, 5, 4, 4)
    whole = minibatch_std(x, 4)
    halves = torch.cat([minibatch_std(x[:4], 4), minibatch_std(x[4:], 4)])
    assert torch.allclose(whole, halves)
    group = x[:4].std(dim=0, unbiased=False).mean()
    assert whole[0, 5, 0, 0].item() == pytest.approx(group.item(), rel=1e-4)


def test_networks_shapes_widths_joint_and_conditional():
    cfg = tiny(resolution=64, channels=3, mask_classes=3, num_classes=2)
    G, D = build_generator(cfg), build_discriminator(cfg)
    labels = torch.tensor([0, 1, 1, 0])
    x = G(torch.randn(4, 16), labels)
    assert x.shape == (4, 6, 64, 64) and x.abs().max() <= 1
    masks = (x[:, 3:] + 1) / 2
    assert torch.allclose(masks.sum(1), torch.ones(4, 64, 64), atol=1e-5)  # softmax mask channels
    assert D(x, labels).shape == (4,)
    assert widths(cfg) == {4: 16, 8: 16, 16: 8, 32: 4, 64: 2} and num_ws(64) == 10
    assert len(G.synthesis.noise_sides()) == num_ws(64) - 1


def test_layer_summary_lists_layers_and_the_total():
    G = build_generator(tiny())
    lines = layer_summary("G", G, "stylegan2")
    total = sum(p.numel() for p in G.parameters())
    assert lines[0].startswith(f"G (stylegan2): {total:,} parameters")
    counts = [int(line.split()[-1].replace(",", "")) for line in lines[1:]]
    assert sum(counts) == total and any("synthesis.convs.0" in line for line in lines)


def test_penalties_known_answers():
    # D(x) = sum(a * x): grad = a everywhere, R1 = ||a||^2 per sample
    a = torch.randn(1, 2, 3, 3)
    penalty, scores = r1_penalty(lambda x, labels=None: (x * a).flatten(1).sum(1), torch.randn(5, 2, 3, 3))
    assert torch.allclose(penalty, a.square().sum().expand(5)) and scores.shape == (5,)
    # images = ws @ M (per layer): path length = ||M y|| averaged over layers
    ws = torch.randn(3, 2, 4, requires_grad=True)
    M = torch.randn(4, 6)
    images = (ws @ M).reshape(3, 1, 2, 6)
    y = torch.randn(3, 1, 2, 6)
    lengths = path_lengths(images, ws, y)
    expected = (y.reshape(3, 2, 6) @ M.T).square().sum(2).mean(1).sqrt()
    assert torch.allclose(lengths, expected, atol=1e-5)


def test_lazy_correction_and_ema_half_life():
    assert lazy_ratio(16, 10.0) == 16 / 17 and lazy_ratio(16, 0.0) == 1.0
    tc = TrainConfig(ema_kimg=1.0)
    decay = ema_decay(tc, 100, 16)
    assert decay ** (1000 / 16) == pytest.approx(0.5)  # 1000 images halve a weight's distance
    ramped = TrainConfig(ema_kimg=10.0, ema_rampup=0.05)
    assert ema_decay(ramped, 0, 16) == 0.0  # nothing seen yet: G-EMA = G
    assert ema_decay(ramped, 100, 16) ** (100 * 16 * 0.05 / 16) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["model.g_norm=none"], "model.g_norm: does not apply to arch stylegan2"),
        (["model.resolution=48"], "model.resolution: must be a power of two"),
        (["train.batch_size=6"], "model.mbstd_group 4 does not divide train.batch_size 6"),
        (["loss.pl_batch_shrink=3", "train.batch_size=4"], "loss.pl_batch_shrink 3 does not divide"),
        (["loss.gp_weight=5"], "loss.gp_weight: applies to the other loss types only"),
        (["loss.type=hinge"], "loss.r1_gamma: applies to stylegan2 only, not loss.type hinge"),
        (["model.mapping_layers=0"], "model.mapping_layers: must be >= 1"),
    ],
)
def test_bad_stylegan2_configs_are_one_line_usage_errors(sets, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        load_train_config("stylegan2-64", sets)


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["model.channel_max=64"], "model.channel_max: applies to arch stylegan2 only"),
        (["loss.r1_gamma=1"], "loss.r1_gamma: applies to stylegan2 only"),
        (["loss.type=stylegan2"], "loss.type: stylegan2 with model.arch dcgan"),
    ],
)
def test_stylegan2_keys_are_refused_in_the_dcgan_layout(sets, needle):
    with pytest.raises(UsageError, match=needle):
        load_train_config("wgan-gp-64", sets)


def test_shipped_stylegan2_configs_build():
    for name in ("stylegan2-64", "stylegan2-256"):
        cfg = load_train_config(name, [])
        assert cfg.model.arch == cfg.loss.type == "stylegan2"
    with torch.device("meta"):
        G = build_generator(build(ModelConfig, {"arch": "stylegan2", "resolution": 256, "channels": 3}))
    assert sum(p.numel() for p in G.parameters()) > 20e6  # the reference's 256x256 G is ~24 M parameters
    assert LossConfig(type="stylegan2").r1_interval == 16


def test_truncation_is_refused_for_a_family_without_a_mapping_network():
    from hpcgan.commands.sample import set_truncation

    G = build_generator(ModelConfig(arch="dcgan", resolution=32, g_base_width=4, max_width=8))
    with pytest.raises(UsageError, match="--truncation: x is a dcgan model, which has no mapping network"):
        set_truncation(G, 0.5, "x")
    set_truncation(G, 1.0, "x")  # 1 = none, for any family
    S = build_generator(tiny())
    set_truncation(S, 0.5, "x")
    assert S.truncation == 0.5
