"""MS-SSIM diversity: mean MS-SSIM over random pairs of generated images, beside the same for
pairs of real (training) images. Generated pairs far more alike than real pairs mean the
generator makes few distinct images (mode collapse).

Scales adapted to small images: Wang et al. (2003) use 5 scales and an 11×11 Gaussian window
(σ 1.5), which needs images of at least 176 px. Smaller images use a 7×7 window and as many of
the 5 scales as keep the coarsest one at least a window wide (64² → 4 scales: 64, 32, 16, 8),
with the standard scale weights of those scales renormalised to sum to 1."""

import numpy as np
import torch
import torch.nn.functional as F

from hpcgan.parallel.group import ONE_PROCESS
from hpcgan.parallel.split import map_units

MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DATA_RANGE = 2.0  # images are in [-1, 1]
NUM_PAIRS = 1000
PAIRS_PER_UNIT = 50
# Flag collapse when generated pairs are more than halfway from the real pairs' similarity to identical.
COLLAPSE_FRACTION = 0.5


def gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    """1-D Gaussian taps (size,), summing to 1; the 2-D window is their outer product (separable)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def blur_matrix(size: int, taps: torch.Tensor) -> torch.Tensor:
    """(size, size − win + 1) matrix M with (row @ M)[j] = Σ_k taps[k] · row[j + k] ('valid' filtering)."""
    win = len(taps)
    out = size - win + 1
    m = torch.zeros(size, out)
    for k in range(win):
        m[torch.arange(out) + k, torch.arange(out)] = taps[k]
    return m


def window_size(height: int, width: int) -> int:
    return 11 if min(height, width) >= 11 * 16 else 7


def num_scales(height: int, width: int) -> int:
    win = window_size(height, width)
    scales = 1
    while scales < len(MS_WEIGHTS) and min(height, width) // 2**scales >= win:
        scales += 1
    return scales


def ssim_terms(x: torch.Tensor, y: torch.Tensor, win: int):
    """Per-image mean SSIM and mean contrast-structure term of (N, C, H, W) tensors ('valid' window)."""
    h, w = x.shape[-2:]
    taps = gaussian_window(win)
    # The five local moments, blurred as two matrix products (much faster than conv2d on CPUs).
    maps = torch.stack([x, y, x * x, y * y, x * y])
    maps = blur_matrix(h, taps).T @ maps @ blur_matrix(w, taps)
    mu_x, mu_y, xx, yy, xy = maps.unbind(0)

    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    return ssim.mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))


def ssim(x, y) -> np.ndarray:
    """Single-scale SSIM of image pairs (N, C, H, W) in [-1, 1] → (N,)."""
    x, y = torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.float32))
    value, _ = ssim_terms(x, y, window_size(*x.shape[-2:]))
    return value.numpy().astype(np.float64)


def ms_ssim(x, y) -> np.ndarray:
    """Multi-scale SSIM of image pairs (N, C, H, W) in [-1, 1] → (N,). Negative terms clip to 0."""
    x, y = torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.float32))
    height, width = x.shape[-2:]
    win, scales = window_size(height, width), num_scales(height, width)
    weights = torch.tensor(MS_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    result = torch.ones(x.shape[0], dtype=torch.float64)
    for s in range(scales):
        value, cs = ssim_terms(x, y, win)
        term = value if s == scales - 1 else cs
        result = result * term.double().clamp(min=0) ** weights[s]
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result.numpy()


def image_pairs(num_images: int, num_pairs: int, seed: int) -> np.ndarray:
    """(P, 2) indices of two different images: every pair when there are at most `num_pairs` of them
    (the exact mean, and no repeated work on small sets such as evaluations during training), else
    `num_pairs` pairs drawn from `seed`."""
    if num_images * (num_images - 1) // 2 <= num_pairs:
        return np.stack(np.triu_indices(num_images, k=1), axis=1)
    rng = np.random.default_rng([seed, num_images])
    first = rng.integers(0, num_images, size=num_pairs)
    offset = rng.integers(1, num_images, size=num_pairs)  # never pair an image with itself
    return np.stack([first, (first + offset) % num_images], axis=1)


def mean_pair_ms_ssim(images, seed: int = 0, num_pairs: int = NUM_PAIRS, group=ONE_PROCESS) -> float:
    """Mean MS-SSIM over random pairs of `images`; the pairs are split across ranks in fixed units."""
    pairs = image_pairs(len(images), num_pairs, seed)
    units = range(0, len(pairs), PAIRS_PER_UNIT)

    def unit(i):
        p = pairs[units[i] : units[i] + PAIRS_PER_UNIT]
        return ms_ssim(images[p[:, 0]], images[p[:, 1]])

    return float(np.concatenate(map_units(group, len(units), unit)).mean())


def compute(fake, train, val, seed=0, group=ONE_PROCESS, **_):
    """value: generated pairs' mean MS-SSIM; baseline: the training images' (real) pairs."""
    if len(fake) < 2 or len(train) < 2:
        return {"value": None, "baseline": None, "note": "needs at least 2 generated and 2 real images"}
    value = mean_pair_ms_ssim(fake, seed, group=group)
    baseline = mean_pair_ms_ssim(train, seed, group=group)
    collapse = value - baseline > COLLAPSE_FRACTION * (1.0 - baseline)
    h, w = fake.shape[-2:]
    return {
        "value": value,
        "baseline": baseline,
        "collapse": bool(collapse),
        "verdict": "mode collapse" if collapse else "ok",
        "scales": num_scales(h, w),
        "window": window_size(h, w),
        "pairs": len(image_pairs(len(fake), NUM_PAIRS, seed)),
    }
