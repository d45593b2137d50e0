"""The pieces the model families share: norms, activations, D input noise, x2 upsampling, the DCGAN
init, the width rule, and the joint image + mask helpers.

Joint mode (`model.mask_classes: K`): G draws K one-hot mask channels after the image channels and D
judges image and mask together (`joint_output`, `encode_masks`, `split_joint`).

Functions that take a config read it duck-typed (any object with ModelConfig's fields), so a family
module can use them without importing hpcgan.models.config, which imports the registry.
"""

import contextlib
import dataclasses
import math

import numpy as np
import torch
from torch import nn


def network_channels(cfg) -> int:
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


def changed_keys(cfg, keys) -> list:
    """Those of `keys` whose value in the config dataclass `cfg` is not the field's default: how a family
    finds keys of another family's layout that a config sets (a checkpoint's config holds every key)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    defaults = {
        k: fields[k].default if fields[k].default is not dataclasses.MISSING else fields[k].default_factory()
        for k in keys
    }
    return [k for k in keys if getattr(cfg, k) != defaults[k]]


def num_doublings(resolution: int) -> int:
    """How many x2 steps lie between 4x4 and the image side."""
    return int(math.log2(resolution)) - 2


def rule_width(cfg, base: int, side: int) -> int:
    """The base-width rule: a feature map of side `side` has min(max_width, base * resolution / (2 side))
    channels (512..64 for a 64x64 DCGAN with base 64)."""
    return max(1, min(cfg.max_width, base * cfg.resolution // (2 * side)))


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


def up_conv(cfg, c_in: int, c_out: int, bias: bool) -> nn.Module:
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
