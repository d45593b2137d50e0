"""StyleGAN2's recipe as a bare PyTorch loop: the baseline benchmarks/train.py holds `hpcgan train` against (a
module, not a benchmark itself: `make bench` leaves it out). The same networks (hpcgan.models, built from the
config), the same penalties and EMA arithmetic (hpcgan's pure functions) and the same work per step as
hpcgan.training.style_steps, written out plainly with nothing around it: in-memory data, latents, mixing and noise
drawn from torch's own RNG on the device, no gradient averaging, no logging, no checks.

A step: D's logistic loss on fakes made without a graph; every r1_interval steps R1 on the reals as its own Adam
step; G's non-saturating loss with D frozen (w_avg moves); every pl_interval steps the path length on
batch / pl_batch_shrink fakes as its own Adam step; then G-EMA with a half-life of train.ema_kimg thousand images.
Both Adams carry the lazy correction (lr x k/(k+1), betas ** k/(k+1), k the interval). Every batch of fakes mixes
two latents at one random layer with probability loss.style_mixing and has fresh noise inputs for every layer.
Regularisers run in float32 with autocast off; fp16 has a gradient scaler per network, as hpcgan's.
"""

import contextlib
import copy
import math
import time

import torch
import torch.nn.functional as F

from hpcgan.losses import lazy_ratio, path_lengths, r1_penalty
from hpcgan.models import build_discriminator, build_generator
from hpcgan.models.stylegan2 import num_ws
from hpcgan.training.steps import ema_decay, update_ema

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def lazy_period(cfg) -> int:
    """Steps in which every lazy regulariser of the recipe comes round a whole number of times, the unit both
    loops are timed in (1 for a recipe without one)."""
    lc = cfg.loss
    if lc.type != "stylegan2":
        return 1
    return math.lcm(*(k for k, weight in ((lc.r1_interval, lc.r1_gamma), (lc.pl_interval, lc.pl_weight)) if weight))


class BareStyleGAN2:
    def __init__(self, cfg, device, amp="none"):
        self.cfg, self.device = cfg, device
        m, lc = cfg.model, cfg.loss
        self.G, self.D = build_generator(m).to(device), build_discriminator(m).to(device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        o = cfg.optim
        self.opt_G = self.adam(self.G, o.lr_g or o.lr, lazy_ratio(lc.pl_interval, lc.pl_weight))
        self.opt_D = self.adam(self.D, o.lr_d or o.lr, lazy_ratio(lc.r1_interval, lc.r1_gamma))
        fp16 = amp == "fp16"
        self.scaler_G = torch.amp.GradScaler(device.type) if fp16 else None
        self.scaler_D = torch.amp.GradScaler(device.type) if fp16 else None
        self.autocast = (lambda: torch.autocast(device.type, DTYPES[amp])) if amp != "none" else contextlib.nullcontext
        self.pl_mean = torch.zeros([], device=device)
        self.num_ws, self.sides = num_ws(m.resolution), self.G.synthesis.noise_sides()

    def adam(self, net, lr: float, ratio: float):
        """Adam with the lazy correction `ratio` (1: none)."""
        o = self.cfg.optim
        betas = (o.beta1**ratio, o.beta2**ratio)
        return torch.optim.Adam(net.parameters(), lr * ratio, betas, weight_decay=o.weight_decay)

    def ws_and_noise(self, batch: int, update_w_avg: bool = False):
        """The ws of `batch` latents (mixed with a second latent's from a random layer on, with probability
        loss.style_mixing) and a noise input per layer."""
        mapping, dim = self.G.mapping, self.cfg.model.latent_dim
        ws = mapping(torch.randn(batch, dim, device=self.device), update_w_avg=update_w_avg)
        if torch.rand(()) < self.cfg.loss.style_mixing:
            cutoff = int(torch.randint(1, self.num_ws, ()))
            ws = torch.cat([ws[:, :cutoff], mapping(torch.randn(batch, dim, device=self.device))[:, cutoff:]], dim=1)
        return ws, [torch.randn(batch, 1, side, side, device=self.device) for side in self.sides]

    def step(self, step: int, real):
        lc, G, D, batch = self.cfg.loss, self.G, self.D, real.shape[0]
        with torch.no_grad(), self.autocast():
            fake = G.render(*self.ws_and_noise(batch))
        with self.autocast():
            loss = F.softplus(-D(real).float()).mean() + F.softplus(D(fake).float()).mean()
        self.adam_step(loss, self.opt_D, self.scaler_D)
        if lc.r1_gamma and step % lc.r1_interval == 0:
            penalty, scores = r1_penalty(D, real)
            loss = (penalty.mean() * (lc.r1_gamma / 2) + scores.mean() * 0) * lc.r1_interval
            self.adam_step(loss, self.opt_D, self.scaler_D)
        D.requires_grad_(False)
        with self.autocast():
            loss = F.softplus(-D(G.render(*self.ws_and_noise(batch, update_w_avg=True))).float()).mean()
        self.adam_step(loss, self.opt_G, self.scaler_G)
        D.requires_grad_(True)
        if lc.pl_weight and step % lc.pl_interval == 0:
            self.path_length_step(batch // lc.pl_batch_shrink)
        update_ema(self.G_ema, self.G, ema_decay(self.cfg.train, step, batch))

    def path_length_step(self, batch: int):
        lc = self.cfg.loss
        with torch.autocast(self.device.type, enabled=False):
            ws, noise = self.ws_and_noise(batch)
            images = self.G.render(ws, noise)
            projection = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
            lengths = path_lengths(images, ws, projection)
            self.pl_mean.copy_(self.pl_mean.lerp(lengths.detach().mean(), lc.pl_decay))
            penalty = (lengths - self.pl_mean).square().mean() * lc.pl_weight
            loss = (penalty + images.mean() * 0) * lc.pl_interval
        self.adam_step(loss, self.opt_G, self.scaler_G)

    @staticmethod
    def adam_step(loss, optimizer, scaler):
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def step_times(cfg, batch: int, steps: int, device, amp: str = "none") -> list:
    """Seconds of each of `steps` steps on `batch` in-memory images (on a GPU one synchronize per step, so that
    the timer sees the work)."""
    loop = BareStyleGAN2(cfg, device, amp)
    m = cfg.model
    real = torch.rand(8 * batch, m.channels, m.resolution, m.resolution, device=device) * 2 - 1
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        loop.step(step, real[(step % 8) * batch : (step % 8 + 1) * batch])
        sync()
        times.append(time.perf_counter() - t0)
    return times
