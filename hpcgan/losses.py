"""GAN objectives: non-saturating BCE, LSGAN, WGAN (weight clipping), WGAN-GP, hinge, and StyleGAN2's recipe
(`stylegan2`: the non-saturating logistic loss, which is bce without smoothing, with lazy R1 and path-length
regularisation, whose penalties are here and whose steps are hpcgan.training.style_steps).

`d_loss` returns ONE scalar (real + fake + penalty terms) so each optimizer step has one backward,
which Horovod's DistributedOptimizer needs. `D` is any callable (x, labels) -> (N,) scores, e.g.
the discriminator behind DiffAugment. Scores are promoted to float32 before the losses (autocast
may hand back bf16/fp16). Stats are detached scalars for logging.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from hpcgan.models.layers import changed_keys

LossType = Literal["bce", "lsgan", "wgan", "wgan-gp", "hinge", "stylegan2"]
# Keys of one recipe that mean nothing in the others.
STYLEGAN2_KEYS = ("r1_gamma", "r1_interval", "pl_weight", "pl_interval", "pl_decay", "pl_batch_shrink", "style_mixing")
OTHER_KEYS = ("gp_weight", "clip_value", "n_critic", "label_smoothing")


@dataclass
class LossConfig:
    type: LossType = "bce"
    gp_weight: float = 10.0  # wgan-gp: lambda of the gradient penalty
    clip_value: float = 0.01  # wgan: D's parameters are clamped to [-c, c] after each D step
    n_critic: int = 1  # D steps per G step
    label_smoothing: float = 0.0  # one-sided: the real target is 1 - s (bce, lsgan)
    # stylegan2 (Karras et al. 2020): R1 = gamma/2 E||grad D(real)||^2 every r1_interval steps; path-length
    # regularisation of weight pl_weight every pl_interval steps on batch / pl_batch_shrink, its target the
    # running mean pl_mean (rate pl_decay); two latents mixed at a random layer with probability style_mixing.
    # Each lazy penalty is scaled by its interval. 0 = off (gamma, pl_weight, style_mixing).
    r1_gamma: float = 10.0
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    style_mixing: float = 0.9

    def __post_init__(self):
        if self.type not in LossType.__args__:
            raise ValueError(f"loss.type: must be one of {', '.join(LossType.__args__)}, got {self.type!r}")
        foreign = changed_keys(self, OTHER_KEYS if self.type == "stylegan2" else STYLEGAN2_KEYS)
        if foreign:
            which = "stylegan2" if foreign[0] in STYLEGAN2_KEYS else "the other loss types"
            raise ValueError(f"loss.{foreign[0]}: applies to {which} only, not loss.type {self.type}")
        for key in ("r1_gamma", "pl_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"loss.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("r1_interval", "pl_interval", "pl_batch_shrink"):
            if getattr(self, key) < 1:
                raise ValueError(f"loss.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("pl_decay", "style_mixing"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"loss.{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.gp_weight < 0:
            raise ValueError(f"loss.gp_weight: must be >= 0, got {self.gp_weight}")
        if not self.clip_value > 0:
            raise ValueError(f"loss.clip_value: must be > 0, got {self.clip_value}")
        if self.n_critic < 1:
            raise ValueError(f"loss.n_critic: must be >= 1, got {self.n_critic}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing and self.type not in ("bce", "lsgan"):
            raise ValueError(f"loss.label_smoothing: only bce and lsgan have a real target, not {self.type}")


def check_loss_model(loss_cfg: LossConfig, model_cfg) -> None:
    """Combinations of loss and model that are wrong, not just unusual."""
    if (loss_cfg.type == "stylegan2") != (model_cfg.arch == "stylegan2"):
        raise ValueError(
            f"loss.type: {loss_cfg.type} with model.arch {model_cfg.arch}: StyleGAN2's networks train with its "
            "recipe and the recipe needs them (its mapping network); set both to stylegan2 or neither"
        )
    if loss_cfg.type == "wgan-gp" and model_cfg.d_norm == "batch":
        raise ValueError(
            "model.d_norm: WGAN-GP needs a critic without batch norm (the penalty is per "
            "sample and batch norm mixes samples); use layer, instance or none"
        )


def gradient_penalty(D, real, fake, labels=None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): mean over samples of (||grad_x D(x_hat)||_2 - 1)^2 at
    x_hat = eps * real + (1 - eps) * fake, eps ~ U(0, 1) per sample (drawn first, torch's RNG).
    Float32 at least, autocast off: the penalty is a second-order term that bf16 ruins. The graph is
    kept (create_graph) so the caller's single backward reaches D's weights."""
    dtype = torch.promote_types(real.dtype, torch.float32)
    with torch.autocast(device_type=real.device.type, enabled=False):
        eps = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), dtype=dtype, device=real.device)
        x_hat = (eps * real.detach().to(dtype) + (1 - eps) * fake.detach().to(dtype)).requires_grad_(True)
        scores = D(x_hat, labels).to(dtype)
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1).square().mean()


def d_loss(cfg: LossConfig, D, real, fake, labels=None, fake_labels=None):
    """Discriminator/critic loss, one scalar. `fake` is detached here. `fake_labels` (default:
    `labels`) are the classes the fakes were generated with, for a conditional GAN."""
    fake = fake.detach()
    fake_labels = labels if fake_labels is None else fake_labels
    s_real = D(real, labels).float()
    s_fake = D(fake, fake_labels).float()
    stats = {"d_real": s_real.detach().mean(), "d_fake": s_fake.detach().mean()}
    target = 1.0 - cfg.label_smoothing
    if cfg.type in ("bce", "stylegan2"):  # the logistic loss: softplus(-D(real)) + softplus(D(fake))
        loss = F.binary_cross_entropy_with_logits(
            s_real, torch.full_like(s_real, target)
        ) + F.binary_cross_entropy_with_logits(s_fake, torch.zeros_like(s_fake))
    elif cfg.type == "lsgan":  # Mao et al. 2017, a-b-c = 0-1-1
        loss = 0.5 * (s_real - target).square().mean() + 0.5 * s_fake.square().mean()
    elif cfg.type == "hinge":
        loss = F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean()
    else:  # wgan, wgan-gp: the critic maximises E[D(real)] - E[D(fake)]
        wdist = s_real.mean() - s_fake.mean()
        loss = -wdist
        stats["wdist"] = wdist.detach()
        if cfg.type == "wgan-gp":
            gp = gradient_penalty(D, real, fake, labels)
            loss = loss + cfg.gp_weight * gp
            stats["gp"] = gp.detach()
    return loss, stats


def g_loss(cfg: LossConfig, D, fake, labels=None):
    """Generator loss on fakes that carry G's graph."""
    s_fake = D(fake, labels).float()
    if cfg.type in ("bce", "stylegan2"):  # non-saturating: maximise log D(G(z))
        loss = F.binary_cross_entropy_with_logits(s_fake, torch.ones_like(s_fake))
    elif cfg.type == "lsgan":
        loss = 0.5 * (s_fake - 1).square().mean()
    else:  # wgan, wgan-gp, hinge
        loss = -s_fake.mean()
    return loss, {"g_fake": s_fake.detach().mean()}


@torch.no_grad()
def clip_weights_(D, c: float) -> None:
    """WGAN (Arjovsky et al. 2017): clamp every parameter of the critic to [-c, c], as the
    reference code does (batch-norm scales included)."""
    for p in D.parameters():
        p.clamp_(-c, c)


def lazy_ratio(interval: int, weight: float) -> float:
    """Karras et al. 2020 (appendix B): a penalty taken every `interval` steps as its own optimizer step makes
    interval + 1 steps where there were interval, so Adam's lr and betas go to the power interval/(interval+1)
    (lr x ratio, beta ** ratio) to keep its time scales. 1 when the penalty is off."""
    return interval / (interval + 1) if weight > 0 else 1.0


def r1_penalty(D, real, labels=None):
    """(R1 per sample ||grad_x D(x)||^2 at the reals, D's scores) in float32 with autocast off (Mescheder et al.
    2018). The graph is kept so that one backward of the caller reaches D's weights."""
    with torch.autocast(device_type=real.device.type, enabled=False):
        x = real.detach().float().requires_grad_(True)
        scores = D(x, labels).float()
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        return grad.square().flatten(1).sum(1), scores


def path_lengths(images, ws, projection):
    """||J_w^T y|| per sample, y = the images' random projection `projection` (N(0, 1) / sqrt(pixels)):
    the path length of Karras et al. 2020, averaged over the w of each layer. The graph is kept."""
    (grad,) = torch.autograd.grad((images.float() * projection).sum(), ws, create_graph=True)
    return grad.square().sum(2).mean(1).sqrt()
