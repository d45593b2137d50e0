"""Generator and discriminator families (DCGAN layout) and the reference study's networks.

Both networks are plain stacks of blocks:
  G: z [+ label embedding] -> FC -> C0 x 4 x 4 -> up blocks (x2 each) -> tanh image
  D: image -> down blocks (4x4 stride 2, or 3x3 stride 1) -> C x 4 x 4 -> FC -> score [+ projection]
Joint mode (`mask_classes: K`): G draws K one-hot mask channels after the image channels and D
judges image and mask together (`joint_output`, `encode_masks`, `split_joint`).
`arch: dcgan` ends G with an up block straight to the image channels (Radford et al. 2016);
`arch: cepa2023` keeps norm/activation/dropout on every up block and adds a 3x3 transposed conv
head, as the study's table prints it (configs/cepa2023.yaml documents our reading).

Widths: `g_channels` / `d_channels` list them explicitly; empty = the base-width rule (a feature
map of side s has min(max_width, base_width * resolution / (2 s)) channels: 512..64 for a 64x64
DCGAN with base 64). Everything is tensors and modules: devices follow the input, no per-rank
Python state; the only randomness (D input noise, dropout) uses torch's RNG in training mode.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

Norm = Literal["batch", "instance", "layer", "none"]
Activation = Literal["relu", "leaky_relu"]


@dataclass
class ModelConfig:
    arch: Literal["dcgan", "cepa2023"] = "dcgan"
    resolution: int = 64
    channels: int = 1
    latent_dim: int = 128
    g_base_width: int = 64
    d_base_width: int = 64
    max_width: int = 512
    # Explicit widths, overriding the base-width rule. G: the feature maps from 4x4 upwards
    # (dcgan: up to resolution/2; cepa2023: up to resolution). D: one per conv.
    g_channels: list[int] = field(default_factory=list)
    d_channels: list[int] = field(default_factory=list)
    # Stride of each D conv: 2 = 4x4 stride-2 conv (halves the side), 1 = 3x3 stride-1 conv.
    # Empty = all 2. The stride-2 convs must take the image down to 4x4.
    d_strides: list[int] = field(default_factory=list)
    g_norm: Norm = "batch"
    d_norm: Norm = "batch"
    g_activation: Activation = "relu"
    d_activation: Activation = "leaky_relu"
    leaky_slope: float = 0.2
    g_dropout: float = 0.0
    d_dropout: float = 0.0
    spectral_norm: bool = False  # on every D conv/linear/embedding (Miyato et al. 2018)
    d_input_noise: float = 0.0  # std of Gaussian noise added to each D layer's input, training only
    upsample: Literal["deconv", "resize"] = "deconv"  # resize = x2 interpolation, then 3x3 conv
    resize_mode: Literal["nearest", "bilinear"] = "nearest"
    num_classes: int = 0  # 0 = unconditional; >0: embedding concatenated to z, projection D
    # Joint image + mask: G also draws a K-class mask (classes 0..K-1 of the dataset's label set) as K
    # one-hot channels after the image channels, and D judges the pair. See `joint_output`.
    mask_classes: int = 0
    init_std: float = 0.02

    def __post_init__(self):
        if self.arch not in ("dcgan", "cepa2023"):
            raise ValueError(f"model.arch: must be dcgan or cepa2023, got {self.arch!r}")
        res = self.resolution
        if not (32 <= res <= 512 and res & (res - 1) == 0):
            raise ValueError(f"model.resolution: must be a power of two from 32 to 512, got {res}")
        for key in ("channels", "latent_dim", "g_base_width", "d_base_width", "max_width"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("g_channels", "d_channels"):
            if any(w < 1 for w in getattr(self, key)):
                raise ValueError(f"model.{key}: widths must be >= 1, got {getattr(self, key)}")
        for key, allowed in (
            ("g_norm", Norm),
            ("d_norm", Norm),
            ("g_activation", Activation),
            ("d_activation", Activation),
            ("upsample", Literal["deconv", "resize"]),
            ("resize_mode", Literal["nearest", "bilinear"]),
        ):
            options = allowed.__args__
            if getattr(self, key) not in options:
                raise ValueError(f"model.{key}: must be one of {', '.join(options)}, got {getattr(self, key)!r}")
        for key in ("g_dropout", "d_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"model.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.mask_classes == 1 or self.mask_classes < 0:
            raise ValueError(f"model.mask_classes: 0 (no mask) or >= 2 (background + classes), got {self.mask_classes}")
        for key in ("leaky_slope", "d_input_noise", "num_classes"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key}: must be >= 0, got {getattr(self, key)}")
        if not self.init_std > 0:
            raise ValueError(f"model.init_std: must be > 0, got {self.init_std}")
        n_up = num_doublings(res)
        want = n_up + 1 if self.arch == "cepa2023" else n_up
        if self.g_channels and len(self.g_channels) != want:
            raise ValueError(
                f"model.g_channels: arch {self.arch} at resolution {res} needs {want} widths "
                f"(feature maps 4x4 to {4 << (want - 1)}x{4 << (want - 1)}), got {len(self.g_channels)}"
            )
        if any(s not in (1, 2) for s in self.d_strides):
            raise ValueError(f"model.d_strides: each stride must be 1 or 2, got {self.d_strides}")
        if self.d_strides and self.d_strides[0] != 2:
            raise ValueError("model.d_strides: the first D conv must have stride 2")
        n_convs = len(self.d_strides) or len(self.d_channels) or n_up
        if self.d_channels and len(self.d_channels) != n_convs:
            raise ValueError(
                f"model.d_channels: {len(self.d_channels)} widths for {n_convs} convs "
                f"(model.d_strides has {len(self.d_strides)})"
            )
        if self.d_strides and self.d_strides.count(2) != n_up:
            raise ValueError(
                f"model.d_strides: resolution {res} needs {n_up} stride-2 convs to reach 4x4, "
                f"got {self.d_strides.count(2)}"
            )
        if not self.d_strides and self.d_channels and len(self.d_channels) != n_up:
            raise ValueError(
                f"model.d_channels: resolution {res} needs {n_up} stride-2 convs, got "
                f"{len(self.d_channels)} widths (set model.d_strides for stride-1 convs)"
            )


def network_channels(cfg: ModelConfig) -> int:
    """Channels G makes and D judges: the image's, then the mask's one-hot channels in joint mode."""
    return cfg.channels + cfg.mask_classes


def joint_output(x: torch.Tensor, image_channels: int) -> torch.Tensor:
    """G's last activations → its output in [-1, 1]: tanh for the image channels; for the mask channels a
    softmax over the classes, scaled to [-1, 1] like a real one-hot mask (`encode_masks`). Softmax, not one
    sigmoid per class: a pixel has exactly one class, the channels are then a distribution over them, and
    the argmax decodes them without ties between "two classes" and "none"."""
    if x.shape[1] == image_channels:
        return torch.tanh(x)
    image, mask = x[:, :image_channels], x[:, image_channels:]
    return torch.cat([torch.tanh(image), torch.softmax(mask.float(), dim=1).to(x.dtype) * 2 - 1], dim=1)


def encode_masks(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) integer classes → (N, K, H, W) one-hot in {-1, +1}, how D sees a real mask."""
    one_hot = torch.nn.functional.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2)
    return one_hot.to(torch.float32) * 2 - 1


def split_joint(x, image_channels: int):
    """(N, C + K, H, W) generated pairs → (images (N, C, H, W), masks (N, H, W) int64 by argmax, or None
    when there are no mask channels). numpy or torch in, the same kind out."""
    if x.shape[1] == image_channels:
        return x, None
    images, scores = x[:, :image_channels], x[:, image_channels:]
    return images, scores.argmax(1) if isinstance(x, torch.Tensor) else scores.argmax(axis=1).astype(np.int64)


def num_doublings(resolution: int) -> int:
    """How many x2 steps lie between 4x4 and the image side."""
    return int(math.log2(resolution)) - 2


def rule_width(cfg: ModelConfig, base: int, side: int) -> int:
    return max(1, min(cfg.max_width, base * cfg.resolution // (2 * side)))


def generator_widths(cfg: ModelConfig) -> list[int]:
    """Widths of G's feature maps from 4x4 upwards (see ModelConfig.g_channels)."""
    if cfg.g_channels:
        return list(cfg.g_channels)
    n = num_doublings(cfg.resolution) + (1 if cfg.arch == "cepa2023" else 0)
    return [rule_width(cfg, cfg.g_base_width, 4 << i) for i in range(n)]


def discriminator_layout(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(width, stride) of each D conv."""
    n_up = num_doublings(cfg.resolution)
    strides = list(cfg.d_strides) or [2] * (len(cfg.d_channels) or n_up)
    if cfg.d_channels:
        return list(zip(cfg.d_channels, strides))
    layout, side = [], cfg.resolution
    for stride in strides:
        side //= stride
        layout.append((rule_width(cfg, cfg.d_base_width, side), stride))
    return layout


def make_norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "instance":
        return nn.InstanceNorm2d(width, affine=True)
    if kind == "layer":  # over (C, H, W) per sample, per-channel affine
        return nn.GroupNorm(1, width)
    return nn.Identity()


def make_activation(kind: str, slope: float) -> nn.Module:
    return nn.LeakyReLU(slope) if kind == "leaky_relu" else nn.ReLU()


class InputNoise(nn.Module):
    """Adds N(0, std^2) to its input in training mode (the study's D; Sonderby et al. 2017)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def forward(self, x):
        if self.training and self.std > 0:
            x = x + self.std * torch.randn_like(x)
        return x

    def extra_repr(self):
        return f"std={self.std}"


def up_conv(cfg: ModelConfig, c_in: int, c_out: int, bias: bool) -> nn.Module:
    """x2 upsampling: a 4x4 stride-2 transposed conv, or interpolation then a 3x3 conv (no checkerboard)."""
    if cfg.upsample == "deconv":
        return nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=cfg.resize_mode), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias))


def init_weights_(module: nn.Module, std: float) -> None:
    """DCGAN init: conv/linear N(0, std), batch-norm scale N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """`module` in eval mode (batch norm on running stats, no dropout or input noise) inside the block;
    on exit, exceptions included, every submodule gets back its own training flag, so a submodule
    that was already in eval mode inside a training model stays so."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        widths = generator_widths(cfg)
        # Conditional: a learned class embedding (of latent size) concatenated to z.
        self.embed = nn.Embedding(cfg.num_classes, cfg.latent_dim) if cfg.num_classes else None
        z_dim = cfg.latent_dim * (2 if cfg.num_classes else 1)
        has_affine_norm = cfg.g_norm != "none"  # a norm's shift makes a conv bias redundant
        self.fc = nn.Linear(z_dim, widths[0] * 16, bias=not has_affine_norm)
        self.fc_post = nn.Sequential(
            make_norm(cfg.g_norm, widths[0]), make_activation(cfg.g_activation, cfg.leaky_slope)
        )
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [
                up_conv(cfg, c_in, c_out, bias=not has_affine_norm),
                make_norm(cfg.g_norm, c_out),
                make_activation(cfg.g_activation, cfg.leaky_slope),
            ]
            if cfg.g_dropout:
                blocks.append(nn.Dropout(cfg.g_dropout))
        if cfg.arch == "cepa2023":  # the study's head: a 3x3 transposed conv at full resolution
            blocks.append(nn.ConvTranspose2d(widths[-1], network_channels(cfg), 3, 1, 1))
        else:  # DCGAN: the last x2 step goes straight to the image channels
            blocks.append(up_conv(cfg, widths[-1], network_channels(cfg), bias=True))
        self.blocks = nn.Sequential(*blocks)
        init_weights_(self, cfg.init_std)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 1.0)  # same scale as z

    def forward(self, z, labels=None):
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional generator (model.num_classes > 0) needs labels")
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        h = self.fc(z).view(z.shape[0], -1, 4, 4)
        return joint_output(self.blocks(self.fc_post(h)), self.cfg.channels)


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        layers, c_in = [], network_channels(cfg)
        for i, (width, stride) in enumerate(discriminator_layout(cfg)):
            norm = "none" if i == 0 else cfg.d_norm  # no norm on the input layer (DCGAN, the study)
            conv = (
                nn.Conv2d(c_in, width, 4, 2, 1, bias=norm == "none")
                if stride == 2
                else nn.Conv2d(c_in, width, 3, 1, 1, bias=norm == "none")
            )
            layers += [
                InputNoise(cfg.d_input_noise),
                conv,
                make_norm(norm, width),
                make_activation(cfg.d_activation, cfg.leaky_slope),
            ]
            if cfg.d_dropout:
                layers.append(nn.Dropout(cfg.d_dropout))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.fc_noise = InputNoise(cfg.d_input_noise)
        self.fc = nn.Linear(c_in * 16, 1)
        # Projection discriminator (Miyato & Koyama 2018): score += <embed(y), features>.
        self.embed = nn.Embedding(cfg.num_classes, c_in * 16) if cfg.num_classes else None
        init_weights_(self, cfg.init_std)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, cfg.init_std)
        if cfg.spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x, labels=None):
        h = self.fc_noise(self.features(x).flatten(1))
        score = self.fc(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional discriminator (model.num_classes > 0) needs labels")
            score = score + (self.embed(labels).to(h.dtype) * h).sum(dim=1)
        return score


def build_generator(cfg: ModelConfig) -> nn.Module:
    """G(z: (N, latent_dim), labels: (N,) int64 | None) -> (N, channels [+ mask_classes], resolution,
    resolution) in [-1, 1]."""
    return Generator(cfg)


def build_discriminator(cfg: ModelConfig) -> nn.Module:
    """D(x: (N, channels [+ mask_classes], resolution, resolution), labels | None) -> (N,) raw scores."""
    return Discriminator(cfg)
