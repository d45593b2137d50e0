"""StyleGAN2's training recipe (`loss.type: stylegan2`; Karras et al. 2020, after stylegan2-ada-pytorch's loss.py)
on GanSteps: style mixing and noise inputs in every generated batch, lazy R1 on D and lazy path-length
regularisation on G, each its own optimizer step (with Adam's lazy correction, hpcgan.losses.lazy_ratio).

A step: D main (logistic loss), then R1 when step % r1_interval == 0; G main, then the path length when
step % pl_interval == 0; then G-EMA. The step number decides, so every rank takes the same lazy steps. Each
optimizer step has one backward and one gradient averaging (Horovod's backward_passes_per_step stays 1); the
penalties are differentiated with autograd.grad(create_graph=True) and then one backward, never
backward(create_graph=True); D is frozen in G's steps and G is not differentiated in D's. In every backward each
parameter of the network gets a gradient (the `* 0` terms, as the reference's): Horovod and the torch backend
average a missing gradient as zero where one process would skip the parameter, and Adam would then differ.

What 2 ranks x b must share with 1 process x 2b is drawn for the global batch from the step's seed, and each rank
takes its slice (steps.py): latents, the mixing latents and the mixing layer (one per batch, as the reference), the
noise inputs and the path length's projection. The last two are pixels, as many as the images': they are drawn per
sample instead (a generator on the rank's device seeded by the sample's index in the global batch), so a rank draws
only its own. The path-length mean is averaged over ranks before it moves the running target pl_mean
(TrainState.pl_mean, checkpointed, the same on every rank); w_avg, the mean w for truncation, moves per rank at each
G step and is averaged over ranks for what is saved (TrainState.sync_buffers): the mean of the ranks' running means
is the running mean of the global batch. Regularisers run in float32, autocast off.
"""

import math

import torch

from hpcgan.generation import seed_for
from hpcgan.losses import path_lengths, r1_penalty
from hpcgan.models.stylegan2 import num_ws
from hpcgan.training.steps import GanSteps

# Sub-streams of a step's stream (steps.py's stream = 2 x rollbacks, + 1 for G).
MIXING, NOISE, PATH_LENGTH, PROJECTION = 1, 2, 3, 4


class StyleGAN2Steps(GanSteps):
    def style_inputs(self, stream: int, substream=(), shrink: int = 1):
        """This rank's slice of the step's draws for a batch of global size global_batch / shrink: (z, labels,
        mixing latents, mixing layer (num_ws = no mixing), the noise inputs)."""
        m, tc, backend = self.cfg.model, self.cfg.train, self.backend
        step, seed = self.state.position.step, tc.seed
        global_batch, batch = self.global_batch // shrink, tc.batch_size // shrink
        z, labels = self.latents(step, stream, substream, shrink)
        part = slice(backend.rank * batch, (backend.rank + 1) * batch)
        g = torch.Generator().manual_seed(seed_for(seed, step, stream, *substream, MIXING))
        mixed = bool(torch.rand((), generator=g) < self.cfg.loss.style_mixing)
        cutoff = int(torch.randint(1, num_ws(m.resolution), (), generator=g)) if mixed else num_ws(m.resolution)
        z_mix = torch.randn(global_batch, m.latent_dim, generator=g)[part].to(backend.device)
        sides = self.state.G.synthesis.noise_sides()
        flat = self.per_sample_normal((stream, *substream, NOISE), sum(side * side for side in sides), batch)
        noise = [n.reshape(batch, 1, side, side) for n, side in zip(flat.split([s * s for s in sides], 1), sides)]
        return z, labels, z_mix, cutoff, noise

    def per_sample_normal(self, keys, size: int, batch: int):
        """(batch, size) N(0, 1) on the rank's device, row i from a generator seeded by (seed, step, *keys, the
        sample's index in the global batch): the draws of one sample whatever the number of ranks, and each rank
        draws only its own rows (pixels of noise grow with the image, not with the world)."""
        tc, backend, step = self.cfg.train, self.backend, self.state.position.step
        rows = []
        for index in range(backend.rank * batch, (backend.rank + 1) * batch):
            g = torch.Generator(backend.device).manual_seed(seed_for(tc.seed, step, *keys, index))
            rows.append(torch.randn(size, generator=g, device=backend.device))
        return torch.stack(rows)

    def mixed_ws(self, z, labels, z_mix, cutoff: int, update_w_avg: bool = False):
        """w of z for the layers below `cutoff`, w of z_mix from it on."""
        mapping = self.state.G.mapping
        ws = mapping(z, labels, update_w_avg=update_w_avg)
        if cutoff >= ws.shape[1]:
            return ws
        return torch.cat([ws[:, :cutoff], mapping(z_mix, labels)[:, cutoff:]], dim=1)

    def generate(self, stream: int, update_averages: bool = False):
        z, labels, z_mix, cutoff, noise = self.style_inputs(stream)
        return self.state.G.render(self.mixed_ws(z, labels, z_mix, cutoff, update_averages), noise), labels

    def d_regularize(self, real, real_labels) -> dict:
        """Lazy R1: gamma/2 E||grad D(real)||^2 x r1_interval, through the augmentation D sees."""
        s, lc = self.state, self.cfg.loss
        if not (lc.r1_gamma > 0 and s.position.step % lc.r1_interval == 0):
            return {}
        penalty, scores = r1_penalty(self.D_aug, real, real_labels)
        loss = (penalty.mean() * (lc.r1_gamma / 2) + scores.mean() * 0) * lc.r1_interval
        self.optimizer_step(loss, s.opt_D, s.scaler_D)
        return {"r1": penalty.detach().mean()}

    def g_regularize(self) -> dict:
        """Lazy path-length regularisation: pl_weight E(||J_w^T y|| - pl_mean)^2 x pl_interval, on
        batch / pl_batch_shrink fakes."""
        s, lc, backend = self.state, self.cfg.loss, self.backend
        if not (lc.pl_weight > 0 and s.position.step % lc.pl_interval == 0):
            return {}
        stream = 2 * s.position.rollbacks + 1
        z, labels, z_mix, cutoff, noise = self.style_inputs(stream, (PATH_LENGTH,), lc.pl_batch_shrink)
        with torch.autocast(backend.device.type, enabled=False):
            ws = self.mixed_ws(z, labels, z_mix, cutoff)
            images = s.G.render(ws, noise)
            projection = self.projection(stream, images.shape)
            lengths = path_lengths(images, ws, projection)
            mean = backend.allreduce_(lengths.detach().mean().reshape(1), "mean")[0]
            s.pl_mean.copy_(s.pl_mean.lerp(mean, lc.pl_decay))
            penalty = (lengths - s.pl_mean).square().mean() * lc.pl_weight
            loss = (penalty + images.mean() * 0) * lc.pl_interval
        self.optimizer_step(loss, s.opt_G, s.scaler_G)
        return {"pl_length": mean, "pl_penalty": penalty.detach()}

    def projection(self, stream: int, shape):
        """The path length's random image-space direction y ~ N(0, 1) / sqrt(pixels), this rank's samples."""
        y = self.per_sample_normal((stream, PATH_LENGTH, PROJECTION), math.prod(shape[1:]), shape[0])
        return y.reshape(shape) / math.sqrt(shape[2] * shape[3])
