"""StyleGAN2 (`arch: stylegan2`; Karras et al. 2020, "Analyzing and improving the image quality of StyleGAN"),
in the layout of NVlabs/stylegan2-ada-pytorch, written anew. Its training recipe is `loss.type: stylegan2`
(hpcgan.training.style_steps).

  G  mapping: z (pixel-normalised) [+ normalised class embedding] -> `mapping_layers` FC layers (learning rate
     x `mapping_lr_mul`) -> w, broadcast to one w per layer; `w_avg` tracks the mean w for truncation.
     synthesis: a learned 4x4 constant; per resolution [x2 up] modulated 3x3 convs with weight demodulation,
     per-pixel noise of learned strength, bias and leaky ReLU (gain sqrt 2); a toRGB (modulated 1x1, no
     demodulation) per resolution summed into the upsampled image so far (skip architecture).
  D  residual: fromRGB at full resolution; per resolution two 3x3 convs (the second halves the side) beside a
     1x1 skip, each path x sqrt(1/2); at 4x4 minibatch standard deviation, a 3x3 conv, FC, FC -> score
     [+ class projection].

Equalised learning rate: every weight is stored N(0, 1) (N(0, 1 / lr_mul) in the mapping) and scaled by
lr_mul / sqrt(fan in) at run time, so Adam's step is the same for every layer. Widths: a feature map of side s
has min(channel_base / s, channel_max) channels. Up/down-sampling: the reference's fixed [1, 3, 3, 1] low-pass
filter, as a depthwise (transposed) convolution of stride 2, which has deterministic CUDA kernels (bilinear
interpolation's backward does not); downsampling convs filter first, then convolve at the lower resolution.
Minibatch std groups `mbstd_group` *consecutive* samples (the reference interleaves them), so a rank's batch of
b makes the groups of its part of one process's batch of N x b, and 2 x b ranks train like 1 x 2b.
Noise: the recipe passes each step's noise explicitly (drawn from the step's seed, hpcgan.training.style_steps);
without it every layer adds its fixed noise buffer, so sampling is a function of z alone (the reference's
noise_mode='const'). Joint mode: the mask classes are extra toRGB channels, and the output goes through
layers.joint_output like every family's. Under autocast (train.amp) conv outputs are clamped to +-256, the
reference's conv_clamp for its fp16 layers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcgan.models.layers import changed_keys, joint_output, network_channels, num_doublings

SQRT2, SQRT_HALF = math.sqrt(2.0), math.sqrt(0.5)
CONV_CLAMP = 256.0
W_AVG_BETA = 0.995  # per G step, as the reference
# The DCGAN layout's keys, which mean nothing here (leaky_slope and latent_dim apply to both).
DCGAN_KEYS = (
    "g_base_width d_base_width max_width g_channels d_channels d_strides g_norm d_norm g_activation "
    "d_activation g_dropout d_dropout spectral_norm d_input_noise upsample resize_mode init_std"
).split()


def widths(cfg) -> dict:
    """Channels of the feature maps by side, 4 to the resolution."""
    return {
        4 << i: max(1, min(cfg.channel_base // (4 << i), cfg.channel_max))
        for i in range(num_doublings(cfg.resolution) + 1)
    }


def num_ws(resolution: int) -> int:
    """One w per modulated conv, plus the last toRGB's."""
    return 2 * num_doublings(resolution) + 2


def activate(x, slope: float, gain: float = SQRT2):
    x = F.leaky_relu(x, slope) * gain
    return clamp_under_autocast(x)


def clamp_under_autocast(x):
    return x.clamp(-CONV_CLAMP, CONV_CLAMP) if torch.is_autocast_enabled(x.device.type) else x


def normalize_2nd_moment(x, eps: float = 1e-8):
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class LowPass(nn.Module):
    """x2 up (zero insertion, then the filter x4) or x2 down (the filter, then every second pixel) with the
    separable [1, 3, 3, 1] kernel; x2 up is bilinear interpolation with zero borders."""

    def __init__(self):
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / taps.sum() ** 2)[None, None], persistent=False)

    def up(self, x):
        k = (self.kernel * 4).to(x.dtype).expand(x.shape[1], 1, 4, 4)
        return F.conv_transpose2d(x, k, stride=2, padding=1, groups=x.shape[1])

    def down(self, x):
        k = self.kernel.to(x.dtype).expand(x.shape[1], 1, 4, 4)
        return F.conv2d(x, k, stride=2, padding=1, groups=x.shape[1])


class EqualLinear(nn.Module):
    def __init__(self, c_in, c_out, bias_init=0.0, lr_mul=1.0, activation=False, slope=0.2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / lr_mul)
        self.bias = nn.Parameter(torch.full([c_out], float(bias_init)))
        self.weight_gain, self.lr_mul = lr_mul / math.sqrt(c_in), lr_mul
        self.activation, self.slope = activation, slope

    def forward(self, x):
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return activate(x, self.slope) if self.activation else x


class EqualConv2d(nn.Module):
    """Conv with equalised lr; `down`: the low-pass x2 down first, then the conv at the lower resolution."""

    def __init__(self, c_in, c_out, kernel, bias=True, activation=True, down=False, slope=0.2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.weight_gain = 1 / math.sqrt(c_in * kernel * kernel)
        self.activation, self.slope = activation, slope
        self.lowpass = LowPass() if down else None

    def forward(self, x, gain: float = 1.0):
        if self.lowpass is not None:
            x = self.lowpass.down(x)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        return activate(x, self.slope, SQRT2 * gain) if self.activation else clamp_under_autocast(x * gain)


class ModulatedConv(nn.Module):
    """A 3x3 synthesis conv (demodulated, noise, bias, leaky ReLU) or, `to_rgb`, a 1x1 output conv (styles x
    1/sqrt(fan in), no demodulation, linear). Modulation as input scaling and demodulation as output scaling
    (the reference's unfused form): the conv's weight is shared by the batch."""

    def __init__(self, c_in, c_out, w_dim, side, up=False, to_rgb=False, slope=0.2):
        super().__init__()
        kernel = 1 if to_rgb else 3
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.to_rgb, self.slope, self.side = to_rgb, slope, side
        self.lowpass = LowPass() if up else None
        if not to_rgb:
            self.noise_strength = nn.Parameter(torch.zeros([]))
            self.register_buffer("noise_const", torch.randn(side, side))

    def forward(self, x, w, noise=None):
        styles = self.affine(w)
        weight = self.weight.to(x.dtype)
        if self.to_rgb:
            styles = styles / math.sqrt(weight[0].numel())
        if self.lowpass is not None:
            x = self.lowpass.up(x)
        x = F.conv2d(x * styles.to(x.dtype)[:, :, None, None], weight, padding=weight.shape[-1] // 2)
        if self.to_rgb:
            return clamp_under_autocast(x + self.bias.to(x.dtype)[:, None, None])
        # sum over inputs and taps of (w s)^2 = s^2 . sum over taps of w^2: no (N, C_out, C_in, k, k) tensor
        dcoefs = (styles.float().square() @ self.weight.float().square().sum([2, 3]).T + 1e-8).rsqrt()
        x = x * dcoefs.to(x.dtype)[:, :, None, None]
        x = x + (self.noise_const if noise is None else noise).to(x.dtype) * self.noise_strength.to(x.dtype)
        return activate(x + self.bias.to(x.dtype)[:, None, None], self.slope)


class Mapping(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, self.num_ws, self.num_classes = cfg.latent_dim, num_ws(cfg.resolution), cfg.num_classes
        self.embed = EqualLinear(cfg.num_classes, dim) if cfg.num_classes else None
        sizes = [dim * (2 if cfg.num_classes else 1)] + [dim] * cfg.mapping_layers
        self.layers = nn.Sequential(
            *(
                EqualLinear(a, b, lr_mul=cfg.mapping_lr_mul, activation=True, slope=cfg.leaky_slope)
                for a, b in zip(sizes[:-1], sizes[1:])
            )
        )
        self.register_buffer("w_avg", torch.zeros(dim))

    def forward(self, z, labels=None, truncation: float = 1.0, update_w_avg: bool = False):
        """(N, num_ws, w_dim); truncation psi < 1 pulls every w towards w_avg."""
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional generator (model.num_classes > 0) needs labels")
            one_hot = F.one_hot(labels, self.num_classes).to(z.dtype)
            x = torch.cat([x, normalize_2nd_moment(self.embed(one_hot))], dim=1)
        w = self.layers(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, W_AVG_BETA))
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)
        return ws if truncation == 1 else self.w_avg.to(ws.dtype).lerp(ws, truncation)


class ConstantInput(nn.Module):
    """The learned 4x4 input of the synthesis network, the same for every sample."""

    def __init__(self, width):
        super().__init__()
        self.const = nn.Parameter(torch.randn(width, 4, 4))

    def forward(self, ws):
        return self.const.to(ws.dtype).expand(ws.shape[0], -1, -1, -1)


class Synthesis(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, dim, slope = widths(cfg), cfg.latent_dim, cfg.leaky_slope
        sides = sorted(ch)
        self.input = ConstantInput(ch[4])
        convs = [ModulatedConv(ch[4], ch[4], dim, 4, slope=slope)]
        for side in sides[1:]:
            convs += [
                ModulatedConv(ch[side // 2], ch[side], dim, side, up=True, slope=slope),
                ModulatedConv(ch[side], ch[side], dim, side, slope=slope),
            ]
        self.convs = nn.ModuleList(convs)
        self.to_rgbs = nn.ModuleList(ModulatedConv(ch[s], network_channels(cfg), dim, s, to_rgb=True) for s in sides)
        self.lowpass = LowPass()

    def noise_sides(self) -> list:
        """The side of each noise input, in the order `forward` takes them."""
        return [conv.side for conv in self.convs]

    def forward(self, ws, noise=None):
        x = self.input(ws)
        image, i = None, 0
        for block, to_rgb in enumerate(self.to_rgbs):
            for _ in range(1 if block == 0 else 2):
                x = self.convs[i](x, ws[:, i], None if noise is None else noise[i])
                i += 1
            y = to_rgb(x, ws[:, i])  # the w of the next block's first conv, as the reference
            image = y if image is None else self.lowpass.up(image) + y
        return image


class Generator(nn.Module):
    """G(z, labels) -> images in [-1, 1]; `truncation` (psi) is what sampling sets, 1 = none."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.truncation = cfg, 1.0
        self.mapping = Mapping(cfg)
        self.synthesis = Synthesis(cfg)

    def forward(self, z, labels=None):
        return self.render(self.mapping(z, labels, self.truncation))

    def render(self, ws, noise=None):
        return joint_output(self.synthesis(ws, noise), self.cfg.channels)


def minibatch_std(x, group: int):
    """x with one more channel: the mean over features and pixels of the standard deviation over each group
    of `group` consecutive samples (all of them when the batch is smaller)."""
    n, c, h, w = x.shape
    size = min(group, n)
    y = x.float().reshape(n // size, size, c, h, w)
    y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1)
    y = (y + 1e-8).sqrt().mean(dim=[1, 2, 3])
    y = y.repeat_interleave(size).reshape(n, 1, 1, 1).expand(n, 1, h, w)
    return torch.cat([x, y.to(x.dtype)], dim=1)


class DiscriminatorBlock(nn.Module):
    def __init__(self, c_in, c_out, slope):
        super().__init__()
        self.conv0 = EqualConv2d(c_in, c_in, 3, slope=slope)
        self.conv1 = EqualConv2d(c_in, c_out, 3, down=True, slope=slope)
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False, activation=False, down=True)

    def forward(self, x):
        return self.skip(x, SQRT_HALF) + self.conv1(self.conv0(x), SQRT_HALF)


class Discriminator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, slope = widths(cfg), cfg.leaky_slope
        sides = sorted(ch, reverse=True)
        self.num_classes, self.mbstd_group = cfg.num_classes, cfg.mbstd_group
        self.from_rgb = EqualConv2d(network_channels(cfg), ch[sides[0]], 1, slope=slope)
        self.blocks = nn.Sequential(*(DiscriminatorBlock(ch[s], ch[s // 2], slope) for s in sides[:-1]))
        self.conv = EqualConv2d(ch[4] + 1, ch[4], 3, slope=slope)
        self.fc = EqualLinear(ch[4] * 16, ch[4], activation=True, slope=slope)
        self.out = EqualLinear(ch[4], 1)
        # Projection (Miyato & Koyama 2018): score += <embed(y), features> / sqrt(width).
        self.embed = EqualLinear(cfg.num_classes, ch[4]) if cfg.num_classes else None

    def forward(self, x, labels=None):
        h = self.blocks(self.from_rgb(x))
        h = self.fc(self.conv(minibatch_std(h, self.mbstd_group)).flatten(1))
        score = self.out(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("a conditional discriminator (model.num_classes > 0) needs labels")
            projection = self.embed(F.one_hot(labels, self.num_classes).to(h.dtype))
            score = score + (projection * h).sum(dim=1) / math.sqrt(h.shape[1])
        return score


def check_config(cfg) -> None:
    changed = changed_keys(cfg, DCGAN_KEYS)
    if changed:
        raise ValueError(
            f"model.{changed[0]}: does not apply to arch stylegan2 (a key of the DCGAN layout); its widths "
            "come from model.channel_base and model.channel_max"
        )
    for key in ("channel_base", "channel_max", "mapping_layers", "mbstd_group"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"model.{key}: must be >= 1, got {getattr(cfg, key)}")
    if not cfg.mapping_lr_mul > 0:
        raise ValueError(f"model.mapping_lr_mul: must be > 0, got {cfg.mapping_lr_mul}")
