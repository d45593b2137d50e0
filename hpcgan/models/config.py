"""The `model:` section of the training config. The rules that hold for every family are checked here;
each family's own rules are its module's `check_config` (hpcgan.models), run last."""

from dataclasses import dataclass, field
from typing import Literal

from hpcgan.models import FAMILIES, family

# The registry's keys, as a Literal so that hpcgan.config.build names them when a config asks for another.
Arch = Literal[tuple(FAMILIES)]
Norm = Literal["batch", "instance", "layer", "none"]
Activation = Literal["relu", "leaky_relu"]


@dataclass
class ModelConfig:
    arch: Arch = "dcgan"
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
    # one-hot channels after the image channels, and D judges the pair. See hpcgan.models.layers.joint_output.
    mask_classes: int = 0
    init_std: float = 0.02
    # arch stylegan2 (hpcgan.models.stylegan2): a feature map of side s has min(channel_base / s, channel_max)
    # channels; the mapping network's depth and learning-rate multiplier; minibatch-std group size (it must
    # divide train.batch_size). The reference's defaults.
    channel_base: int = 32768
    channel_max: int = 512
    mapping_layers: int = 8
    mapping_lr_mul: float = 0.01
    mbstd_group: int = 4

    def __post_init__(self):
        arch_family = family(self.arch)  # first: an unknown arch is the one error
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
        arch_family.check_config(self)
