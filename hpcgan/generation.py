"""Latents and generated images, one way for training, evaluation and sampling alike.

Every latent comes from a torch generator seeded by a tuple of integers (`seed_for`): training steps by
(seed, step, stream), the progress grid by (seed, GRID_STREAM), and every generated image anyone scores or
keeps by (seed, IMAGE_STREAM, i): image i of a run's image set. Training-time evaluation (seed =
train.seed, images 0..eval.num_images-1), `hpcgan evaluate --checkpoint` (the checkpoint's train.seed, the
same images) and `hpcgan sample` (stack k holds images k*stack_size onwards) all call `generate_images`.
Latents are drawn on the CPU, so the images depend neither on the device, the batch size nor the number of
ranks, nor on how the indices are split across them."""

import numpy as np
import torch

from hpcgan.config import build
from hpcgan.errors import UsageError
from hpcgan.io import sha256_file
from hpcgan.log import get_logger
from hpcgan.models import build_generator
from hpcgan.models.config import ModelConfig
from hpcgan.models.layers import eval_mode, network_channels, split_joint
from hpcgan.training.checkpointing import load_checkpoint

log = get_logger("generation")

IMAGE_STREAM = 2**30  # the stream of image set latents: (seed, IMAGE_STREAM, i)
GRID_STREAM = 2**31 - 1  # the progress grid's latents, the same at every step and on every resume


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


def class_labels(labels, indices, num_classes: int):
    """(len(indices),) int64 labels of images `indices`: image i gets labels[i % len(labels)] (default: every
    class, i % num_classes), or None for an unconditional model. A label the model lacks is a UsageError."""
    if not num_classes:
        if labels:
            raise UsageError("--labels: the model is unconditional (model.num_classes = 0)")
        return None
    labels = list(range(num_classes)) if not labels else list(labels)
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise UsageError(f"--labels: {bad[0]} is not a class of this model (0 to {num_classes - 1})")
    return torch.tensor([labels[i % len(labels)] for i in indices], dtype=torch.int64)


def image_latents(indices, latent_dim: int, seed: int) -> torch.Tensor:
    """The latents of images `indices` of the image set seeded by `seed`, one stream per image."""
    if not len(indices):
        return torch.zeros(0, latent_dim)
    return torch.cat([draw_latents(1, latent_dim, seed, IMAGE_STREAM, i) for i in indices])


def generate_images(G, indices, seed: int, labels=None, batch_size: int = 64, progress=None) -> torch.Tensor:
    """Images number `indices` of the image set of `seed`, (len(indices), C [+ K mask channels of a joint
    model: split them with hpcgan.models.layers.split_joint], H, W) float32 in [-1, 1] on the CPU. `labels`:
    the classes a conditional model cycles over (default all); `progress`: a tqdm bar to update."""
    indices = list(indices)
    z = image_latents(indices, G.cfg.latent_dim, seed)
    return run_generator(G, z, class_labels(labels, indices, G.cfg.num_classes), batch_size, progress)


def load_generator(checkpoint, ema: bool = True, device="cpu", source: str = "checkpoint"):
    """G of a checkpoint (dict or path), built from its `config.model`, in eval mode on `device`.
    A config the networks do not know, or weights that do not fit it, are a UsageError naming `source`."""
    if not isinstance(checkpoint, dict):
        source = str(checkpoint)
        checkpoint = load_checkpoint(checkpoint)
    model = (checkpoint.get("config") or {}).get("model")
    if not isinstance(model, dict):
        raise UsageError(f"{source}: the checkpoint has no model config (config.model)")
    cfg = build(ModelConfig, model, source=f"{source} (config)", prefix="model.")
    key = "G_ema" if ema and checkpoint.get("G_ema") is not None else "G"
    if ema and key == "G":
        log.warning("%s: no EMA generator in the checkpoint; using G", source)
    if not isinstance(checkpoint.get(key), dict):
        raise UsageError(f"{source}: the checkpoint has no {key} weights")
    G = build_generator(cfg)
    try:
        G.load_state_dict(checkpoint[key])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{source}: the {key} weights do not fit the model in its config ({first})") from None
    return G.eval().requires_grad_(False).to(device)


def run_seed(checkpoint: dict) -> int:
    """train.seed of the run a checkpoint comes from: the seed of its evaluation images (0 if unrecorded)."""
    return int(((checkpoint.get("config") or {}).get("train") or {}).get("seed") or 0)


def checkpoint_images(path, num_images: int, image_channels: int) -> tuple:
    """(images, masks or None, provenance) of the first `num_images` of the image set of checkpoint file `path`
    (its train.seed: the images its evaluation during training scored), as `hpcgan evaluate --checkpoint` and
    `hpcgan turing-test make --checkpoint` score and show them. Masks come from a joint image + mask model;
    provenance is {"source": "checkpoint", "checkpoint_sha256", "step"}."""
    checkpoint = load_checkpoint(path)
    G = load_generator(checkpoint, source=str(path))
    images, masks = split_joint(generate_images(G, range(num_images), run_seed(checkpoint)).numpy(), image_channels)
    provenance = {"source": "checkpoint", "checkpoint_sha256": sha256_file(path), "step": checkpoint.get("step")}
    return images, masks, provenance
