"""Memorisation audit: is any generated image a (near) copy of a training image?

For each generated image, its nearest training image by RMS pixel distance between
fingerprints (the images average-pooled to at most 32 px a side, for speed), minimised over
every shift of the generated image by up to two pixels (so a shifted copy is still a copy). The
same for each validation image gives the distances of real *new* images to the training set; a
generated image closer than the 1st percentile of those is flagged. value = fraction flagged
(≈ 0.01 for images as new as validation ones); the set is flagged when more than TOLERANCE are.
SSIM of each nearest pair is reported beside. The worst pairs can be written as side-by-side PNGs
(generated | training)."""

import os

import numpy as np
import torch
import torch.nn.functional as F

from hpcgan.parallel.group import ONE_PROCESS
from hpcgan.parallel.split import map_units
from hpcgan.metrics.msssim import ssim
from hpcgan.stacks import contact_sheet, write_png

FINGERPRINT_SIZE = 32
MAX_SHIFT = 2  # pixels at full resolution
PERCENTILE = 1.0
TOLERANCE = 0.05
IMAGES_PER_UNIT = 64
NUM_WORST = 8


def fingerprints(images) -> torch.Tensor:
    """(N, C, H, W) → (N, C, h, w) average-pooled to at most FINGERPRINT_SIZE px a side."""
    x = torch.as_tensor(np.asarray(images, np.float32))
    factor = max(1, max(x.shape[-2:]) // FINGERPRINT_SIZE)
    return F.avg_pool2d(x, factor) if factor > 1 else x


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) pixels, uncovered pixels filled with background (-1)."""
    m = MAX_SHIFT
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    h, w = x.shape[-2:]
    return padded[:, :, m - dy : m - dy + h, m - dx : m - dx + w]


def nearest(query: torch.Tensor, reference: torch.Tensor):
    """For each query image: (index of the nearest reference fingerprint, RMS distance), minimised
    over shifts of the query."""
    ref = reference.flatten(1).double()
    ref_sq = (ref * ref).sum(1)
    best = torch.full((len(query),), float("inf"), dtype=torch.float64)
    index = torch.zeros(len(query), dtype=torch.int64)
    for dy in range(-MAX_SHIFT, MAX_SHIFT + 1):
        for dx in range(-MAX_SHIFT, MAX_SHIFT + 1):
            q = fingerprints(shifted(query, dy, dx)).flatten(1).double()
            d2 = (q * q).sum(1)[:, None] + ref_sq[None, :] - 2.0 * q @ ref.T
            d2_min, i_min = d2.min(dim=1)
            better = d2_min < best
            best = torch.where(better, d2_min, best)
            index = torch.where(better, i_min, index)
    return index.numpy(), np.sqrt(np.maximum(best.numpy(), 0.0) / ref.shape[1])


def nearest_training(images, train, train_fp, group=ONE_PROCESS):
    """(nearest training index, RMS distance, SSIM of the pair) for every image, split across ranks."""
    units = range(0, len(images), IMAGES_PER_UNIT)

    def unit(i):
        chunk = images[units[i] : units[i] + IMAGES_PER_UNIT]
        idx, dist = nearest(torch.as_tensor(chunk), train_fp)
        return idx, dist, ssim(chunk, train[idx])

    parts = map_units(group, len(units), unit)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def write_worst_pairs(fake, train, worst: list, worst_dir):
    """Side-by-side PNGs (generated | nearest training image) of the worst pairs."""
    os.makedirs(worst_dir, exist_ok=True)
    for row in worst:
        pair = np.stack([fake[row["generated"]], train[row["train"]]])
        write_png(contact_sheet(pair, nrow=2), os.path.join(worst_dir, row["png"]))


def compute(fake, train, val, group=ONE_PROCESS, worst_dir=None, **_):
    """value: fraction of generated images closer to a training image than the 1st percentile of
    validation→training distances; baseline: the same fraction for the validation images."""
    if val is None or len(val) == 0:
        return {"value": None, "baseline": None, "note": "needs a validation split for its threshold"}
    train_fp = fingerprints(train)
    f_idx, f_dist, f_ssim = nearest_training(fake, train, train_fp, group)
    _, v_dist, v_ssim = nearest_training(val, train, train_fp, group)
    threshold = float(np.percentile(v_dist, PERCENTILE))
    value = float(np.mean(f_dist < threshold))
    order = np.argsort(f_dist, kind="stable")[:NUM_WORST]
    worst = [
        {
            "generated": int(i),
            "train": int(f_idx[i]),
            "distance": float(f_dist[i]),
            "ssim": float(f_ssim[i]),
            "png": f"worst-{k:03d}.png",
        }
        for k, i in enumerate(order)
    ]
    if worst_dir is not None and group.is_root:
        write_worst_pairs(fake, train, worst, worst_dir)
    flagged = value > TOLERANCE
    return {
        "value": value,
        "baseline": float(np.mean(v_dist < threshold)),
        "threshold": threshold,
        "flagged": bool(flagged),
        "verdict": "memorisation" if flagged else "ok",
        "distance": {"generated_median": float(np.median(f_dist)), "val_median": float(np.median(v_dist))},
        "ssim": {"generated_max": float(f_ssim.max()), "val_max": float(v_ssim.max())},
        "worst": worst,
    }
