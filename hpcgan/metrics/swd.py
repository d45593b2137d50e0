"""Sliced Wasserstein distance on Laplacian-pyramid patches (ProGAN, Karras et al. 2018).

Each image is split into a Laplacian pyramid down to 16 px; from every level 128 random 7×7
patches per image are the descriptors; per level, the distance between the generated and the
real descriptor sets is the sliced Wasserstein distance over 4 × 128 random unit directions
(fixed by `seed`), reported ×1e3 as in the paper, and averaged over the levels.

One deliberate difference from ProGAN: both sets are normalised with the *training* set's
per-channel mean and standard deviation (ProGAN normalises each set by its own, which hides a
global change of brightness or contrast)."""

import numpy as np
import torch
import torch.nn.functional as F

from hpcgan.parallel.group import ONE_PROCESS
from hpcgan.parallel.split import map_units
from hpcgan.metrics.msssim import blur_matrix

PATCH = 7
PATCHES_PER_IMAGE = 128
MIN_RESOLUTION = 16
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
SCALE = 1e3
IMAGES_PER_UNIT = 64
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """5×5 binomial blur with reflected edges, as two matrix products (fast on CPUs)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return blur_matrix(h + 4, _BINOMIAL).T @ padded @ blur_matrix(w + 4, _BINOMIAL)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x: torch.Tensor, shape) -> torch.Tensor:
    up = torch.zeros((*x.shape[:2], *shape), dtype=x.dtype)
    up[:, :, ::2, ::2] = x
    return _blur(up) * 4.0


def laplacian_pyramid(images) -> list:
    """(N, C, H, W) → levels, finest first: band-pass levels, then the coarsest Gaussian (≥ 16 px)."""
    x = torch.as_tensor(np.asarray(images, np.float32))
    levels = []
    while min(x.shape[-2:]) // 2 >= MIN_RESOLUTION:
        down = pyr_down(x)
        levels.append(x - pyr_up(down, x.shape[-2:]))
        x = down
    levels.append(x)
    return [level.numpy() for level in levels]


def patch_descriptors(level: np.ndarray, rng) -> np.ndarray:
    """PATCHES_PER_IMAGE random 7×7 patches of each image → (N · PATCHES_PER_IMAGE, C·7·7)."""
    n, c, h, w = level.shape
    ys = rng.integers(0, h - PATCH + 1, size=(n, PATCHES_PER_IMAGE))
    xs = rng.integers(0, w - PATCH + 1, size=(n, PATCHES_PER_IMAGE))
    offsets = np.arange(PATCH)
    rows = (ys[..., None] + offsets)[..., :, None]  # (n, P, 7, 1)
    cols = (xs[..., None] + offsets)[..., None, :]  # (n, P, 1, 7)
    image = np.arange(n)[:, None, None, None]
    patches = level.transpose(0, 2, 3, 1)[image, rows, cols]  # (n, P, 7, 7, C)
    return patches.transpose(0, 1, 4, 2, 3).reshape(n * PATCHES_PER_IMAGE, c * PATCH * PATCH)


def descriptors(images, seed: int, which: int, group=ONE_PROCESS) -> list:
    """Per pyramid level, the patch descriptors of a set, computed in fixed chunks of images split
    across ranks; `which` keeps the sets' patch draws apart."""
    units = range(0, len(images), IMAGES_PER_UNIT)

    def unit(u):
        levels = laplacian_pyramid(images[units[u] : units[u] + IMAGES_PER_UNIT])
        return [patch_descriptors(level, np.random.default_rng([seed, which, u, i])) for i, level in enumerate(levels)]

    parts = map_units(group, len(units), unit)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def normaliser(desc: np.ndarray, channels: int):
    """Per-channel mean and std over a descriptor set (C·49 columns → C statistics)."""
    per_channel = desc.reshape(len(desc), channels, -1)
    mean = per_channel.mean(axis=(0, 2), dtype=np.float64)
    std = per_channel.std(axis=(0, 2), dtype=np.float64) + 1e-8
    return np.repeat(mean, PATCH * PATCH).astype(np.float32), np.repeat(std, PATCH * PATCH).astype(np.float32)


def sorted_projections(desc: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """(K, n): the descriptors projected on each of the K directions, sorted (rows contiguous: fast sort)."""
    return np.sort(directions.T @ desc.T, axis=1)


def _match_length(sorted_values: np.ndarray, n: int) -> np.ndarray:
    """Quantiles of sorted (K, m) projections at n evenly spaced levels (sets of unequal size)."""
    m = sorted_values.shape[1]
    if m == n:
        return sorted_values
    return sorted_values[:, ((np.arange(n) + 0.5) * m / n).astype(np.int64)]


def sliced_wasserstein(pa: np.ndarray, pb: np.ndarray) -> float:
    """Mean over directions of the 1-D Wasserstein distance between sorted projections (K, n)."""
    n = min(pa.shape[1], pb.shape[1])
    return float(np.abs(_match_length(pa, n) - _match_length(pb, n)).mean())


def directions(dim: int, seed: int, level: int, repeat: int) -> np.ndarray:
    d = np.random.default_rng([seed, 1000 + level, repeat]).standard_normal((dim, DIRS_PER_REPEAT))
    return (d / np.linalg.norm(d, axis=0, keepdims=True)).astype(np.float32)


def compute(fake, train, val, seed=0, group=ONE_PROCESS, **_):
    """value: SWD(generated, train) ×1e3 averaged over levels; baseline: SWD(val, train)."""
    channels = train.shape[1]
    sets = {"fake": descriptors(fake, seed, 0, group), "train": descriptors(train, seed, 1, group)}
    if val is not None and len(val):
        sets["val"] = descriptors(val, seed, 2, group)
    num_levels = len(sets["train"])
    stats = [normaliser(d, channels) for d in sets["train"]]
    for name in sets:
        sets[name] = [(d - mean) / std for d, (mean, std) in zip(sets[name], stats)]
    units = [(level, repeat) for level in range(num_levels) for repeat in range(DIR_REPEATS)]

    def unit(i):
        level, repeat = units[i]
        dirs = directions(sets["train"][level].shape[1], seed, level, repeat)
        real = sorted_projections(sets["train"][level], dirs)
        return {
            name: sliced_wasserstein(sorted_projections(sets[name][level], dirs), real)
            for name in sets
            if name != "train"
        }

    results = map_units(group, len(units), unit)
    per_level = {
        name: [
            SCALE * float(np.mean([results[i][name] for i, u in enumerate(units) if u[0] == level]))
            for level in range(num_levels)
        ]
        for name in results[0]
    }
    resolutions = [int(train.shape[-1]) // 2**level for level in range(num_levels)]
    out = {
        "value": float(np.mean(per_level["fake"])),
        "baseline": None,
        "levels": per_level["fake"],
        "resolutions": resolutions,
    }
    if "val" in per_level:
        out["baseline"] = float(np.mean(per_level["val"]))
        out["baseline_levels"] = per_level["val"]
    return out
