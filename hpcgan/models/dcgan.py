"""The DCGAN layout (`arch: dcgan`, Radford et al. 2016): both networks are plain stacks of blocks.

  G: z [+ label embedding] -> FC -> C0 x 4 x 4 -> up blocks (x2 each) -> tanh image
  D: image -> down blocks (4x4 stride 2, or 3x3 stride 1) -> C x 4 x 4 -> FC -> score [+ projection]

G's feature maps run from 4x4 to resolution/2 and its last up block goes straight to the image channels.
Conditional (`num_classes`): a learned class embedding concatenated to z, and a projection D.

Widths: `g_channels` / `d_channels` list them explicitly; empty = the base-width rule (`rule_width`: a
feature map of side s has min(max_width, base_width * resolution / (2 s)) channels: 512..64 for a 64x64
DCGAN with base 64). The study's networks (cepa2023) reuse this D and subclass this G.
"""

import torch
from torch import nn

from hpcgan.models.layers import (
    InputNoise,
    changed_keys,
    init_weights_,
    joint_output,
    make_activation,
    make_norm,
    network_channels,
    num_doublings,
    rule_width,
    up_conv,
)


def generator_widths(cfg, num_maps: int) -> list[int]:
    """Widths of G's `num_maps` feature maps from 4x4 upwards (see ModelConfig.g_channels)."""
    if cfg.g_channels:
        return list(cfg.g_channels)
    return [rule_width(cfg, cfg.g_base_width, 4 << i) for i in range(num_maps)]


def discriminator_layout(cfg) -> list[tuple[int, int]]:
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


class Generator(nn.Module):
    """A family whose G differs only in how far its up blocks go and in its last layer subclasses this
    one and overrides `num_feature_maps` and `make_head` (cepa2023)."""

    @staticmethod
    def num_feature_maps(resolution: int) -> int:
        """4x4 up to resolution/2: the head makes the last x2 step."""
        return num_doublings(resolution)

    @staticmethod
    def make_head(cfg, width: int) -> nn.Module:
        """The last x2 step, straight to the image channels (no norm or activation after it)."""
        return up_conv(cfg, width, network_channels(cfg), bias=True)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        widths = generator_widths(cfg, self.num_feature_maps(cfg.resolution))
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
        blocks.append(self.make_head(cfg, widths[-1]))
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
    def __init__(self, cfg):
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


def check_generator_widths(cfg, num_maps: int) -> None:
    """model.g_channels, if given, has one width per feature map of G."""
    if cfg.g_channels and len(cfg.g_channels) != num_maps:
        side = 4 << (num_maps - 1)
        raise ValueError(
            f"model.g_channels: arch {cfg.arch} at resolution {cfg.resolution} needs {num_maps} widths "
            f"(feature maps 4x4 to {side}x{side}), got {len(cfg.g_channels)}"
        )


def check_discriminator_layout(cfg) -> None:
    """model.d_strides and model.d_channels describe convs whose stride-2 ones take the image to 4x4."""
    n_up = num_doublings(cfg.resolution)
    if any(s not in (1, 2) for s in cfg.d_strides):
        raise ValueError(f"model.d_strides: each stride must be 1 or 2, got {cfg.d_strides}")
    if cfg.d_strides and cfg.d_strides[0] != 2:
        raise ValueError("model.d_strides: the first D conv must have stride 2")
    n_convs = len(cfg.d_strides) or len(cfg.d_channels) or n_up
    if cfg.d_channels and len(cfg.d_channels) != n_convs:
        raise ValueError(
            f"model.d_channels: {len(cfg.d_channels)} widths for {n_convs} convs "
            f"(model.d_strides has {len(cfg.d_strides)})"
        )
    if cfg.d_strides and cfg.d_strides.count(2) != n_up:
        raise ValueError(
            f"model.d_strides: resolution {cfg.resolution} needs {n_up} stride-2 convs to reach 4x4, "
            f"got {cfg.d_strides.count(2)}"
        )
    if not cfg.d_strides and cfg.d_channels and len(cfg.d_channels) != n_up:
        raise ValueError(
            f"model.d_channels: resolution {cfg.resolution} needs {n_up} stride-2 convs, got "
            f"{len(cfg.d_channels)} widths (set model.d_strides for stride-1 convs)"
        )


# StyleGAN2's keys (hpcgan.models.stylegan2), which mean nothing in this layout.
STYLEGAN2_KEYS = "channel_base channel_max mapping_layers mapping_lr_mul mbstd_group".split()


def check_foreign_keys(cfg) -> None:
    changed = changed_keys(cfg, STYLEGAN2_KEYS)
    if changed:
        raise ValueError(f"model.{changed[0]}: applies to arch stylegan2 only, not {cfg.arch}")


def check_config(cfg) -> None:
    check_foreign_keys(cfg)
    check_generator_widths(cfg, Generator.num_feature_maps(cfg.resolution))
    check_discriminator_layout(cfg)
