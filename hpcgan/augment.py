"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to every image D sees,
real and fake alike (each call draws its own random parameters from torch's RNG, so a seed makes
it reproducible). `policy` is a comma list of:
  translation  shift by up to 1/8 of the side, zero padding
  cutout       zero a square of half the side at a random place
  color        brightness (+U(-0.5, 0.5)) and contrast (x U(0.5, 1.5) around the mean); the
               paper's saturation is left out: it is meaningless on single-channel MRI
"""

import torch
import torch.nn.functional as F


def rand_brightness(x):
    return x + (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def rand_contrast(x):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def rand_translation(x, ratio: float = 0.125):
    """Shift each image by (dy, dx) in [-ratio*side, ratio*side], filling with zeros."""
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    # Output pixel (i, j) reads input (i - dy, j - dx); out-of-range reads land on the zero padding.
    src_rows = (rows - dy + 1).clamp(0, h + 1).expand(n, h, w)
    src_cols = (cols - dx + 1).clamp(0, w + 1).expand(n, h, w)
    padded = F.pad(x, [1, 1, 1, 1])
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, src_rows, src_cols].permute(0, 3, 1, 2)


def rand_cutout(x, ratio: float = 0.5):
    """Zero one square of side ratio*side per image, centred anywhere in the image."""
    n, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - size_y % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - size_x % 2), (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        ((rows - (cy - size_y // 2)) >= 0)
        & ((rows - (cy - size_y // 2)) < size_y)
        & ((cols - (cx - size_x // 2)) >= 0)
        & ((cols - (cx - size_x // 2)) < size_x)
    )
    return x * (~inside).unsqueeze(1).to(x.dtype)


POLICIES = {
    "color": (rand_brightness, rand_contrast),
    "translation": (rand_translation,),
    "cutout": (rand_cutout,),
}


def diff_augment(x, policy: str):
    """Apply the policy's ops in the order listed; empty policy = identity."""
    for name in (p.strip() for p in policy.split(",")):
        if not name:
            continue
        if name not in POLICIES:
            raise ValueError(f"train.diffaugment: unknown policy '{name}' (known: {', '.join(sorted(POLICIES))})")
        for op in POLICIES[name]:
            x = op(x)
    return x
