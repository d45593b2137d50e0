"""One discriminator step and one generator step, and the latents they draw.

Reproducibility (what makes 2 ranks equal 1 process and a resume bit-exact): the latents of a step
come from a generator seeded by (seed, step, stream), stream = 2 x rollbacks (+1 for G); each step
draws the latents of the *global* batch and a rank takes its slice, so what a rank sees never
depends on history. Everything else random inside a step (dropout, D input noise, DiffAugment or ADA,
the gradient-penalty mix) uses the per-rank torch RNG, saved per rank in each checkpoint. ADA's p moves
only by statistics summed over ranks, so it is the same on every rank."""

import random
from contextlib import nullcontext

import numpy as np
import torch

from hpcgan.augment import diff_augment
from hpcgan.generation import seed_for
from hpcgan.losses import clip_weights_, d_loss, g_loss

# Below this the fp16 gradient scaler has overflowed step after step (2**16 halved 17 times, and
# gradients overflow float16 even unscaled): it skips every step and nothing trains any more.
MIN_FP16_SCALE = 1.0
# What can go non-finite, cause first: a NaN D loss on one rank makes every rank's D weights NaN
# (the gradient average), hence the G loss of every rank after it.
NONFINITE_KINDS = ("loss_d", "loss_g", "weights")


def seed_rank(seed: int, rank: int, step: int = 0):
    """Per-rank global RNGs (torch, numpy, Python) for the random ops inside the step."""
    s = seed_for(seed, rank, step, 7)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def latent_slice(seed, step, stream, global_batch, latent_dim, num_classes, rank, batch, device, substream=()):
    """This rank's slice of the global batch of latents (and fake class labels) for `step`. Drawn on the
    CPU (the same numbers on any device); on CUDA copied from pinned memory without waiting. `substream`:
    more keys, for a family's further draws of the same step."""
    g = torch.Generator().manual_seed(seed_for(seed, step, stream, *substream))
    z = torch.randn(global_batch, latent_dim, generator=g)
    labels = torch.randint(0, max(num_classes, 1), (global_batch,), generator=g)
    part = slice(rank * batch, (rank + 1) * batch)
    z, labels = z[part], (labels[part] if num_classes else None)
    if device.type != "cuda":
        return z, labels
    # A non-blocking copy from pageable memory is a synchronous one; pinned, it overlaps the GPU's work.
    return (
        z.pin_memory().to(device, non_blocking=True),
        labels.pin_memory().to(device, non_blocking=True) if labels is not None else None,
    )


def autocast_for(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class GanSteps:
    """The D and G updates of one training step on this rank's batch, through the backend's gradient
    averaging. Returns the statistics to log (tensors: no device-to-host copy here)."""

    def __init__(self, cfg, state, backend):
        self.cfg, self.state, self.backend = cfg, state, backend
        self.global_batch = cfg.train.batch_size * backend.world_size
        policy, ada = cfg.train.diffaugment, state.ada
        # Joint mode: the first model.channels channels are the image, the mask channels follow.
        channels = cfg.model.channels
        if ada is not None:
            self.augment = lambda x: ada(x, channels)
        elif policy:
            self.augment = lambda x: diff_augment(x, policy, channels)
        else:
            self.augment = lambda x: x

    def D_aug(self, x, labels=None):
        return self.state.D(self.augment(x), labels)

    def latents(self, step: int, stream: int, substream=(), shrink: int = 1):
        """This rank's slice of the step's latents `stream` (latent_slice), of a global batch / `shrink`."""
        m, tc = self.cfg.model, self.cfg.train
        return latent_slice(
            tc.seed,
            step,
            stream,
            self.global_batch // shrink,
            m.latent_dim,
            m.num_classes,
            self.backend.rank,
            tc.batch_size // shrink,
            self.backend.device,
            substream,
        )

    def d_step(self, real, real_labels) -> dict:
        """Fakes without a graph through G, one backward for real + fake + penalty."""
        s, lc, pos = self.state, self.cfg.loss, self.state.position
        with torch.no_grad(), self.amp():
            fake, fake_labels = self.generate(2 * pos.rollbacks)
        D, seen = self.D_aug, {}
        if s.ada is not None:

            def D(x, labels=None):  # keeps D's scores of the real batch, which d_loss hands over as it is
                scores = self.D_aug(x, labels)
                if x is real:
                    seen["real"] = scores
                return scores

        with self.amp():
            loss, stats = d_loss(lc, D, real, fake, real_labels, fake_labels)
        self.optimizer_step(loss, s.opt_D, s.scaler_D)
        if lc.type == "wgan":
            clip_weights_(s.D, lc.clip_value)
        if s.ada is not None:
            stats.update(self.observe_overfitting(seen["real"], stats["d_fake"]))
        return {"loss_d": loss.detach(), **stats, **self.d_regularize(real, real_labels)}

    def generate(self, stream: int, update_averages: bool = False):
        """(fakes, their class labels) of this rank's slice of the step's latents `stream`; `update_averages`
        in G's main step (a family's running statistics of its latents, StyleGAN2's w_avg)."""
        z, labels = self.latents(self.state.position.step, stream)
        return self.state.G(z, labels), labels

    def d_regularize(self, real, real_labels) -> dict:
        """A family's lazy D regulariser, its own optimizer step after the main one (none here)."""
        return {}

    def g_regularize(self) -> dict:
        """A family's lazy G regulariser, its own optimizer step after the main one (none here)."""
        return {}

    def observe_overfitting(self, real_scores, fake_mean) -> dict:
        """ADA's heuristic r_t = E[sign(D(real) - c)] on this step's (augmented) real batch, c being D's
        decision boundary: 0 for bce and hinge (Karras et al.'s E[sign(D(real))]), half the real target for
        lsgan, and for wgan/wgan-gp, whose critic has no fixed zero (only differences of scores count), the
        batch's mean fake score. Every ada_interval D steps p moves by the r_t of the interval over all ranks."""
        s, lc = self.state, self.cfg.loss
        if lc.type in ("wgan", "wgan-gp"):
            boundary = fake_mean.float()
        else:
            boundary = (1.0 - lc.label_smoothing) / 2 if lc.type == "lsgan" else 0.0
        signs = (real_scores.detach().float() - boundary).sign()
        s.ada.observe(signs)
        if (s.position.step + 1) % s.ada.interval == 0:
            # Whole numbers summed over ranks: exact, so every rank computes the same p from them.
            totals = torch.tensor(s.ada.local_totals(), dtype=torch.float64)
            s.ada.adjust(*self.backend.allreduce_(totals, "sum").tolist())
        return {"r_t": signs.mean()}

    def g_step(self) -> dict:
        """D frozen so that its gradient hooks stay silent; then the EMA of G."""
        s, pos = self.state, self.state.position
        s.D.requires_grad_(False)
        with self.amp():
            fake, fake_labels = self.generate(2 * pos.rollbacks + 1, update_averages=True)
            loss, stats = g_loss(self.cfg.loss, self.D_aug, fake, fake_labels)
        self.optimizer_step(loss, s.opt_G, s.scaler_G)
        s.D.requires_grad_(True)
        stats.update(self.g_regularize())
        if s.G_ema is not None:
            update_ema(s.G_ema, s.G, ema_decay(self.cfg.train, pos.step, self.global_batch))
        return {"loss_g": loss.detach(), **stats}

    def optimizer_step(self, loss, optimizer, scaler):
        """One backward of `loss` (scaled under fp16) and one averaged optimizer step."""
        optimizer.zero_grad()  # torch >= 2.0: grads set to None
        (scaler.scale(loss) if scaler else loss).backward()
        self.backend.step(optimizer, scaler)

    def amp(self):
        return autocast_for(self.cfg.train.amp, self.backend.device)

    def g_step_due(self) -> bool:
        return (self.state.position.step + 1) % self.cfg.loss.n_critic == 0

    def nonfinite(self, losses: dict):
        """This rank's (kind, description) when the step just taken went NaN/inf here, else None."""
        s = self.state
        return nonfinite_reason(losses, {"G": s.G, "D": s.D}, {"G": s.scaler_G, "D": s.scaler_D})


def ema_decay(tc, step: int, global_batch: int) -> float:
    """G-EMA's decay at `step`. train.ema_kimg > 0: a half-life of that many thousand images (over all
    ranks), ramped up to train.ema_rampup x the images seen so far when that is set (Karras et al.); else
    train.ema_decay, ramped up as (1 + step) / (10 + step) early on."""
    if tc.ema_kimg > 0:
        images = tc.ema_kimg * 1000
        if tc.ema_rampup > 0:
            images = min(images, step * global_batch * tc.ema_rampup)
        return 0.5 ** (global_batch / max(images, 1e-8))
    return min(tc.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(G_ema, G, decay):
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.lerp_(p, 1.0 - decay)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def nonfinite_reason(losses: dict, networks: dict, scalers: dict):
    """None when this rank's step is finite, else (kind, description), kind one of NONFINITE_KINDS:
    a loss that is NaN/inf here, or "weights" (a parameter or buffer is, or the fp16 scale fell below
    MIN_FP16_SCALE). Checked after the optimizer step: Adam turns one non-finite averaged gradient
    into non-finite weights on every rank, and batch-norm buffers take in a poisoned batch."""
    tensors = {
        name: [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
        for name, net in networks.items()
    }
    # A sum is NaN/inf when any term is (or past 3e38, where weights have diverged anyway): 30x faster
    # than isfinite().all() on a CPU (35 M parameters: 50 ms, not 1.5 s), one device-to-host copy.
    sums = [t.sum().float() for t in (*losses.values(), *(t for ts in tensors.values() for t in ts))]
    scales = {name: s.get_scale() for name, s in scalers.items() if s is not None}
    if bool(torch.isfinite(torch.stack(sums)).all()) and all(v >= MIN_FP16_SCALE for v in scales.values()):
        return None
    for name, loss in losses.items():
        if not torch.isfinite(loss).all():
            return name, f"{name} is {float(loss)}"
    for name, ts in tensors.items():
        if not all(torch.isfinite(t).all() for t in ts):
            return "weights", f"the weights of {name} are not finite"
    name, scale = min(scales.items(), key=lambda item: item[1])
    return "weights", f"the fp16 gradient scale of {name} fell to {scale:g} (every step overflows)"
