"""The model families (hpcgan/models/): the registry, the DCGAN layout and the study's networks, their
config rules, the shared layers."""

import time
import types
import typing

import pytest
import torch
import yaml
from torch import nn

from conftest import REPO
from hpcgan.config import build
from hpcgan.errors import UsageError
from hpcgan.losses import LossConfig, check_loss_model, d_loss, g_loss
from hpcgan.models import FAMILIES, build_discriminator, build_generator, cepa2023, dcgan, family
from hpcgan.models.config import ModelConfig
from hpcgan.models.layers import InputNoise, eval_mode, has_batch_norm, network_channels

CONFIGS = REPO / "configs"


def shipped(name):
    """The model and loss sections of a shipped config, validated like `hpcgan train` does."""
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    return build(ModelConfig, data["model"], name, "model."), build(LossConfig, data.get("loss", {}), name, "loss.")


def tiny(**kw):
    return ModelConfig(**{"g_base_width": 4, "d_base_width": 4, "max_width": 16, "latent_dim": 8, **kw})


def layer_shapes(module):
    """(kind, weight shape) of every conv/linear in order: the layout a paper's table prints."""
    return [
        (type(m).__name__, tuple(m.weight.shape))
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]


def check_shapes(cfg, n):
    G, D = build_generator(cfg), build_discriminator(cfg)
    labels = torch.arange(n) % cfg.num_classes if cfg.num_classes else None
    x = G(torch.randn(n, cfg.latent_dim), labels)
    assert x.shape == (n, cfg.channels, cfg.resolution, cfg.resolution)
    assert x.abs().max() <= 1
    scores = D(x, labels)
    assert scores.shape == (n,)
    scores.sum().backward()  # gradients reach G through D
    assert all(p.grad is not None for p in G.parameters())


# ---------------------------------------------------------------- the registry


def test_registry_lists_the_archs_model_config_accepts():
    assert list(FAMILIES) == ["dcgan", "cepa2023", "stylegan2"]
    assert typing.get_args(typing.get_type_hints(ModelConfig)["arch"]) == tuple(FAMILIES)  # the loader's choices
    for arch, module in FAMILIES.items():
        assert ModelConfig(arch=arch).arch == arch and family(arch) is module


def test_unknown_arch_is_one_error_naming_the_families():
    message = "model.arch: must be one of dcgan, cepa2023, stylegan2, got 'stylegan9'"
    with pytest.raises(ValueError) as info:
        ModelConfig(arch="stylegan9", resolution=48)  # the arch is checked first: one error, not the resolution's
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        family("stylegan9")
    assert str(info.value) == message
    with pytest.raises(UsageError) as info:
        build(ModelConfig, {"arch": "stylegan9"}, "x.yaml", "model.")
    assert str(info.value) == "x.yaml: 'model.arch' must be one of dcgan, cepa2023, stylegan2, got 'stylegan9'"


@pytest.mark.parametrize(
    "arch, key, value, message",
    [
        ("dcgan", "g_channels", [8] * 5, "model.g_channels: arch dcgan at resolution 64 needs 4 widths"),
        ("cepa2023", "g_channels", [8] * 4, "model.g_channels: arch cepa2023 at resolution 64 needs 5 widths"),
        ("dcgan", "d_strides", [1, 2, 2, 2, 2], "model.d_strides: the first D conv must have stride 2"),
        ("cepa2023", "d_strides", [2, 2, 1, 2], "model.d_strides: resolution 64 needs 4 stride-2 convs"),
        ("cepa2023", "d_channels", [8, 8], "model.d_channels: resolution 64 needs 4 stride-2 convs"),
    ],
)
def test_each_family_checks_its_own_keys(arch, key, value, message):
    cfg = tiny(arch=arch)
    setattr(cfg, key, value)  # past __post_init__: the family's check_config alone
    with pytest.raises(ValueError, match=message):
        FAMILIES[arch].check_config(cfg)
    with pytest.raises(ValueError, match=message):  # and ModelConfig runs it
        tiny(arch=arch, **{key: value})


def test_g_channels_length_is_the_family_rule():
    widths = [16, 8, 8, 4]  # 4x4 to 32x32: the DCGAN G at 64x64, one short for the study's
    cfg = tiny(g_channels=widths)
    dcgan.check_config(cfg)
    cfg.arch = "cepa2023"
    with pytest.raises(ValueError, match="arch cepa2023 at resolution 64 needs 5 widths"):
        cepa2023.check_config(cfg)
    assert len(layer_shapes(build_generator(tiny(arch="cepa2023", g_channels=[*widths, 4])))) == 6  # FC, 4 up, head


class ToyGenerator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.latent_dim, network_channels(cfg) * cfg.resolution**2)

    def forward(self, z, labels=None):
        return torch.tanh(self.fc(z)).view(len(z), -1, self.cfg.resolution, self.cfg.resolution)


class ToyDiscriminator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(network_channels(cfg) * cfg.resolution**2, 1)

    def forward(self, x, labels=None):
        return self.fc(x.flatten(1)).squeeze(1)


def toy_check_config(cfg):
    if cfg.g_channels:
        raise ValueError(f"model.g_channels: the toy family has no feature maps, got {cfg.g_channels}")


def test_a_new_family_is_one_module(monkeypatch):
    toy = types.ModuleType("toy")  # what hpcgan/models/toy.py would hold
    toy.Generator, toy.Discriminator, toy.check_config = ToyGenerator, ToyDiscriminator, toy_check_config
    monkeypatch.setitem(FAMILIES, "toy", toy)
    cfg = tiny(arch="toy", resolution=32)
    assert isinstance(build_generator(cfg), ToyGenerator) and isinstance(build_discriminator(cfg), ToyDiscriminator)
    check_shapes(cfg, n=2)
    with pytest.raises(ValueError, match="model.g_channels: the toy family has no feature maps"):
        tiny(arch="toy", g_channels=[4])
    with pytest.raises(ValueError, match="model.resolution"):  # the rules of every family still hold
        tiny(arch="toy", resolution=48)


# ---------------------------------------------------------------- the networks


@pytest.mark.parametrize("arch", ["dcgan", "cepa2023"])
@pytest.mark.parametrize("resolution", [32, 64, 128, 256, 512])
def test_shapes_every_resolution(resolution, arch):
    check_shapes(
        tiny(resolution=resolution, arch=arch, channels=3, max_width=8 if resolution > 128 else 16),
        n=1 if resolution == 512 else 2,
    )


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("upsample", ["deconv", "resize"])
@pytest.mark.parametrize("norm", ["batch", "instance", "layer", "none"])
def test_shapes_every_option(norm, upsample, num_classes):
    check_shapes(
        tiny(
            g_norm=norm,
            d_norm=norm,
            upsample=upsample,
            num_classes=num_classes,
            g_dropout=0.1,
            d_dropout=0.1,
            d_input_noise=0.1,
            g_activation="leaky_relu",
        ),
        n=2,
    )


def test_conditional_labels_change_outputs():
    cfg = tiny(num_classes=2)
    G, D = build_generator(cfg).eval(), build_discriminator(cfg).eval()
    z = torch.randn(3, cfg.latent_dim)
    zeros, ones = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    assert not torch.allclose(G(z, zeros), G(z, ones))
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    assert not torch.allclose(D(x, zeros), D(x, ones))
    with pytest.raises(ValueError, match="needs labels"):
        G(z)


def test_cepa2023_matches_paper_tables():
    cfg, loss = shipped("cepa2023")
    G, D = build_generator(cfg), build_discriminator(cfg)
    assert layer_shapes(G) == [
        ("Linear", (16384, 128)),  # FC 128 -> 16384 = 1024 x 4 x 4
        ("ConvTranspose2d", (1024, 512, 4, 4)),
        ("ConvTranspose2d", (512, 256, 4, 4)),
        ("ConvTranspose2d", (256, 128, 4, 4)),
        ("ConvTranspose2d", (128, 64, 4, 4)),
        ("ConvTranspose2d", (64, 32, 4, 4)),
        ("ConvTranspose2d", (32, 3, 4, 4)),
        ("ConvTranspose2d", (3, 3, 3, 3)),  # the 3x3 head before tanh
    ]
    assert layer_shapes(D) == [
        ("Conv2d", (32, 3, 4, 4)),
        ("Conv2d", (64, 32, 4, 4)),
        ("Conv2d", (128, 64, 4, 4)),
        ("Conv2d", (156, 128, 4, 4)),
        ("Conv2d", (156, 156, 3, 3)),
        ("Conv2d", (512, 156, 4, 4)),
        ("Conv2d", (512, 512, 3, 3)),
        ("Conv2d", (1024, 512, 4, 4)),
        ("Conv2d", (1024, 1024, 3, 3)),
        ("Linear", (1, 1024 * 4 * 4)),
    ]
    count = lambda net, kind: sum(isinstance(m, kind) for m in net.modules())  # noqa: E731
    # G: batch norm + LeakyReLU(0.2) after the FC and each of the six stride-2 convs; dropout on those six.
    assert count(G, nn.BatchNorm2d) == 7 and count(G, nn.Dropout) == 6
    assert [m.negative_slope for m in G.modules() if isinstance(m, nn.LeakyReLU)] == [0.2] * 7
    # D: batch norm on all convs but the input one, none on the FC; ReLU; noise before all ten layers.
    assert count(D, nn.BatchNorm2d) == 8 and count(D, nn.ReLU) == 9
    assert [m.std for m in D.modules() if isinstance(m, InputNoise)] == [0.2] * 10
    assert loss.type == "wgan" and loss.n_critic == 1
    G.eval(), D.eval()
    with torch.no_grad():
        x = G(torch.randn(1, 128))
        assert x.shape == (1, 3, 256, 256)
        assert D(x).shape == (1,)


def test_init_is_normal_with_init_std():
    cfg, _ = shipped("dcgan-64")
    torch.manual_seed(0)
    for net in (build_generator(cfg), build_discriminator(cfg)):
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.weight.numel() > 1000:
                assert abs(m.weight.mean().item()) < 0.002
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
            if getattr(m, "bias", None) is not None:
                assert not m.bias.any()
        bn_scales = torch.cat([m.weight.detach() for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
        assert bn_scales.mean().item() == pytest.approx(1.0, abs=0.005)
        assert bn_scales.std().item() == pytest.approx(0.02, rel=0.2)


def test_d_input_noise_only_in_training():
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    D = build_discriminator(tiny(d_norm="none", d_input_noise=0.5))
    assert sum(isinstance(m, InputNoise) for m in D.modules()) == 5  # 4 convs + FC
    assert not torch.equal(D(x), D(x))
    D.eval()
    assert torch.equal(D(x), D(x))
    quiet = build_discriminator(tiny(d_norm="none", d_input_noise=0.0))
    assert torch.equal(quiet(x), quiet(x))  # no noise asked: deterministic in training mode too


def test_spectral_norm_on_every_discriminator_layer():
    from torch.nn.utils.parametrize import is_parametrized

    D = build_discriminator(tiny(d_norm="none", spectral_norm=True, num_classes=2))
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) == 6 and all(is_parametrized(m, "weight") for m in layers)
    x, labels = torch.rand(2, 1, 64, 64), torch.tensor([0, 1])
    for _ in range(20):  # power iterations run in training mode
        D(x, labels)
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)
    plain = build_discriminator(tiny())
    assert not any(is_parametrized(m) for m in plain.modules())
    assert not any(is_parametrized(m) for m in build_generator(tiny(spectral_norm=True)).modules())


def checkerboard_fraction(x):
    """Share of the (non-DC) power at the Nyquist frequencies: the checkerboard pattern."""
    x = x.double() - x.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square()
    n = x.shape[-1] // 2
    return ((power[..., n, n] + power[..., 0, n] + power[..., n, 0]) / power.sum(dim=(-2, -1))).mean().item()


@pytest.mark.parametrize("arch", ["dcgan", "cepa2023"])
def test_resize_upsampling_has_no_checkerboard(arch):
    fractions = {}
    for upsample in ("deconv", "resize"):
        torch.manual_seed(0)
        G = build_generator(
            ModelConfig(resolution=64, g_base_width=16, max_width=64, upsample=upsample, arch=arch)
        ).eval()
        with torch.no_grad():
            fractions[upsample] = checkerboard_fraction(G(torch.randn(8, 128)))
    assert fractions["deconv"] > 0.01
    assert fractions["resize"] < fractions["deconv"] / 20


@pytest.mark.parametrize("name", ["wgan-gp-64", "hinge-sn-128", "dcgan-64"])
def test_autocast_bf16(name):
    cfg, _ = shipped(name)
    G, D = build_generator(cfg), build_discriminator(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = D(G(torch.randn(2, cfg.latent_dim)))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert all(b.dtype != torch.bfloat16 for b in D.buffers())  # spectral-norm vectors stay float32


@pytest.mark.parametrize("name", ["cepa2023", "dcgan-64", "wgan-gp-64", "hinge-sn-128"])
def test_shipped_configs_are_valid(name):
    model, loss = shipped(name)
    check_loss_model(loss, model)


def test_eval_mode_restores_each_training_flag():
    G = build_generator(tiny())  # batch norm: training mode updates running stats, eval mode does not
    frozen = next(m for m in G.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    z = torch.randn(4, 8)
    with eval_mode(G):
        assert not any(m.training for m in G.modules())
        stats = [b.clone() for b in G.buffers()]
        G(z)
        assert all(torch.equal(a, b) for a, b in zip(stats, G.buffers()))
    assert G.training and not frozen.training  # a submodule already in eval mode stays there
    with pytest.raises(RuntimeError), eval_mode(G):
        raise RuntimeError("sampling failed")
    assert [m.training for m in G.modules()] == [m is not frozen for m in G.modules()]
    G.eval()
    with eval_mode(G):
        pass
    assert not any(m.training for m in G.modules())  # an eval-mode model is not switched to training


def test_has_batch_norm():
    assert has_batch_norm(build_discriminator(tiny(d_norm="batch")))
    assert not has_batch_norm(build_discriminator(tiny(d_norm="layer")))
    assert has_batch_norm(build_generator(tiny()))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("resolution", 48, "model.resolution: must be a power of two"),
        ("resolution", 1024, "model.resolution"),
        ("g_norm", "group", "model.g_norm"),
        ("g_channels", [64, 32], "model.g_channels: arch dcgan at resolution 64 needs 4 widths"),
        ("d_channels", [8, 16, 32], "model.d_channels"),
        ("d_strides", [2, 2, 1, 2], "model.d_strides: resolution 64 needs 4 stride-2 convs"),
        ("g_dropout", 1.0, "model.g_dropout"),
    ],
)
def test_bad_model_config_names_the_key(key, value, message):
    with pytest.raises(UsageError, match=message) as info:
        build(ModelConfig, {key: value}, "x.yaml", "model.")
    assert "\n" not in str(info.value)


def test_wgan_gp_64_steps_fast_on_one_core():
    cfg, loss = shipped("wgan-gp-64")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        G, D = build_generator(cfg), build_discriminator(cfg)
        opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
        real = torch.rand(8, 1, 64, 64) * 2 - 1
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            with torch.no_grad():
                fake = G(torch.randn(8, cfg.latent_dim))
            opt_D.zero_grad()
            d_loss(loss, D, real, fake)[0].backward()
            opt_D.step()
            D.requires_grad_(False)
            opt_G.zero_grad()
            g_loss(loss, D, G(torch.randn(8, cfg.latent_dim)))[0].backward()
            opt_G.step()
            D.requires_grad_(True)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert min(times[1:]) < 0.5, times  # the demo and the tests rely on this


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["wgan-gp-64", "hinge-sn-128", "cepa2023"])
def test_cuda_step_under_autocast(name):
    """Devices follow the input: a full D and G step on CUDA under bf16 autocast, with DiffAugment."""
    from hpcgan.augment import diff_augment

    cfg, loss = shipped(name)
    device = torch.device("cuda")
    G, D = build_generator(cfg).to(device), build_discriminator(cfg).to(device)
    D_aug = lambda x, labels=None: D(diff_augment(x, "translation,cutout,color"), labels)  # noqa: E731
    real = torch.rand(2, cfg.channels, cfg.resolution, cfg.resolution, device=device) * 2 - 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_D, stats = d_loss(loss, D_aug, real, G(torch.randn(2, cfg.latent_dim, device=device)))
    loss_D.backward()
    assert torch.isfinite(loss_D) and all(v.device.type == "cuda" for v in stats.values())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_G, _ = g_loss(loss, D_aug, G(torch.randn(2, cfg.latent_dim, device=device)))
    loss_G.backward()
    assert torch.isfinite(loss_G) and all(p.grad is not None for p in G.parameters())
