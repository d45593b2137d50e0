"""Latents and generated images, one way for training and sampling alike.

Every latent comes from a torch generator seeded by a tuple of integers (`seed_for`): training steps
by (seed, step, stream), the progress grid by (seed, 2**31 - 1), the evaluation set image by image
by (seed, 2**30, i), `hpcgan sample` stack by stack by (seed, stream). Latents are drawn on the CPU,
so the images do not depend on the device, the batch size or the number of ranks."""

import numpy as np
import torch

from hpcgan.networks import eval_mode, network_channels


def seed_for(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (seed, step, stream, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def draw_latents(n: int, latent_dim: int, *keys: int) -> torch.Tensor:
    """(n, latent_dim) standard normal latents on the CPU from the stream seeded by `keys`."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed_for(*keys)))


@torch.no_grad()
def run_generator(G, z, labels=None, batch_size: int = 64, progress=None) -> torch.Tensor:
    """G(z, labels) in eval mode, in batches on G's device, as float32 on the CPU. `progress`: a tqdm
    bar to update with the images done."""
    device = next(G.parameters()).device
    out = []
    with eval_mode(G):
        for start in range(0, len(z), batch_size):
            end = min(start + batch_size, len(z))
            out.append(
                G(z[start:end].to(device), None if labels is None else labels[start:end].to(device)).float().cpu()
            )
            if progress is not None:
                progress.update(end - start)
    if not out:
        m = G.cfg
        return torch.zeros(0, network_channels(m), m.resolution, m.resolution)
    return torch.cat(out)
