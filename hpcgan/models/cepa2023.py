"""The reference study's networks (`arch: cepa2023`; configs/cepa2023.yaml documents our reading).

G keeps norm/activation/dropout on every up block, so its feature maps run from 4x4 up to the full
resolution, and adds a 3x3 transposed-conv head before tanh, as the study's table prints it. D is the
DCGAN layout's (hpcgan.models.dcgan), which has the study's options: stride-1 3x3 convs (`d_strides`),
input noise before every layer (`d_input_noise`), and norm on every conv but the input one.
"""

from torch import nn

from hpcgan.models.dcgan import Discriminator, check_discriminator_layout, check_foreign_keys, check_generator_widths
from hpcgan.models.dcgan import Generator as DCGANGenerator
from hpcgan.models.layers import network_channels, num_doublings

__all__ = ["Generator", "Discriminator", "check_config"]


class Generator(DCGANGenerator):
    @staticmethod
    def num_feature_maps(resolution: int) -> int:
        """4x4 up to the full resolution: every x2 step is a full up block."""
        return num_doublings(resolution) + 1

    @staticmethod
    def make_head(cfg, width: int) -> nn.Module:
        """The study's head: a 3x3 transposed conv at full resolution."""
        return nn.ConvTranspose2d(width, network_channels(cfg), 3, 1, 1)


def check_config(cfg) -> None:
    check_foreign_keys(cfg)
    check_generator_widths(cfg, Generator.num_feature_maps(cfg.resolution))
    check_discriminator_layout(cfg)
