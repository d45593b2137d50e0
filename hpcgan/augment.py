"""Differentiable augmentations applied to every image D sees, real and fake alike (each call draws
its random parameters from torch's per-rank RNG, saved in checkpoints, so a seed makes it reproducible).

Two ways to use them, mutually exclusive:
- DiffAugment (Zhao et al. 2020, `train.diffaugment`): the listed ops on every image, always.
- ADA (Karras et al. 2020, `train.ada_*`): each op of `train.ada_policy` applied to each image with
  probability p, and p steered during training by the overfitting heuristic r_t = E[sign(D(real))]
  (`AdaptiveAugment`; for lsgan and wgan the sign is taken about D's decision boundary, see
  GanSteps.observe_overfitting): above `ada_target` D is overfitting and p rises, below it p falls.

Ops (a policy is a comma list of their names):
  translation  integer shift by up to 1/8 of the side; DiffAugment pads with zeros, ADA reflects
  cutout       zero a square of half the side at a random place
  color        brightness (+U(-0.5, 0.5)) and contrast (x U(0.5, 1.5) around the mean); the paper's
               saturation is left out: it is meaningless on single-channel MRI. Under ADA each of the
               two is its own op with probability p.
  flip         (ADA) left-right mirror, with probability p/2: the images stay unflipped more often than
               flipped whatever p. Left-right only: a brain is roughly symmetric about the midsagittal
               plane, never top-bottom.
  rotate       (ADA) rotation by U(-10, 10) degrees: small, the range of head poses in a scanner
  scale        (ADA) isotropic zoom by 2**N(0, 0.1**2) (Karras: 0.2; MRI fields of view vary less)
rotate and scale are one bilinear resampling (affine_grid/grid_sample) with *reflection* padding, like
ADA's translation: the border of an MRI slice is background (-1), and reflection continues that
background, where zero padding would draw a mid-grey frame (0 in [-1, 1]) that no real image has, an
easy cue for D and an artefact that G could learn; it also keeps joint mode's one-hot mask channels
made of mask values. grid_sample's CUDA backward adds gradients with atomics and has no deterministic
kernel, so torch.use_deterministic_algorithms raises in the first backward: train.deterministic=true on
CUDA refuses rotate and scale before training starts (`nondeterministic_ops`, checked by
hpcgan.training.checks.check_deterministic); on the CPU the backward is deterministic and both are allowed.

Joint mode (`model.mask_classes`): the tensors hold `image_channels` image channels and then the mask
channels. Geometric ops (translation, flip, rotate, scale, cutout) move every channel identically, so
image and mask stay aligned; intensity ops (color) touch only the image channels.

Leaking (Karras et al. 2020, sec. 2.2): an augmentation is non-leaking when it is an invertible
transformation of probability distributions, so that D comparing augmented reals with augmented fakes
still tells the generator the un-augmented distribution; then the generated images stay clean. Many
ops are invertible only when skipped part of the time (p < 1), and in practice training is poorly
conditioned close to p = 1 as well: the paper finds leaks unlikely while p stays below about 0.8, and
`train.ada_p_max=0.8` enforces that limit when in doubt.
  scale        log-normal isotropic scaling: the paper's example of an inherently safe augmentation that
               does not leak at any p.
  translation  integer translation with the identity among its outcomes: invertible for p < 1 (the
               paper's pixel blitting group); at p near 1 shifted anatomy or padding could leak.
  flip         invertible for p < 1 (flipped images are at most half of them). A left-right symmetric
               distribution is unchanged by it and cannot leak at all; with lateralised anatomy or
               pathology it can, at high p, wash out the asymmetry of the generated images.
  rotate       small rotations: invertible for p < 1 like the paper's arbitrary rotations; may leak at high p.
  color        invertible for p < 1; the paper sees colour transformations leak at high p.
  cutout       DiffAugment applies it to every image (p = 1), where nothing guarantees it does not leak
               (the generator may learn to draw holes); under ADA at p < 1 it is invertible in theory,
               but Karras et al. found that cutout (like additive noise) did not improve results, so it is
               not in the default ADA policy.
"""

import math

import torch
import torch.nn.functional as F


def rand_brightness(x):
    return x + (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def rand_contrast(x):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def rand_translation(x, ratio: float = 0.125, padding: str = "zeros"):
    """Shift each image by (dy, dx) in [-ratio*side, ratio*side], filling with zeros or (padding="reflection")
    with the image mirrored at its edge."""
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    if padding == "reflection":  # shifts are under a side, so one reflection at each edge is enough
        src_rows = _reflect(rows - dy, h).expand(n, h, w)
        src_cols = _reflect(cols - dx, w).expand(n, h, w)
        return x.permute(0, 2, 3, 1)[batch, src_rows, src_cols].permute(0, 3, 1, 2)
    # Output pixel (i, j) reads input (i - dy, j - dx); out-of-range reads land on the zero padding.
    src_rows = (rows - dy + 1).clamp(0, h + 1).expand(n, h, w)
    src_cols = (cols - dx + 1).clamp(0, w + 1).expand(n, h, w)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[batch, src_rows, src_cols].permute(0, 3, 1, 2)


def _reflect(index, size):
    """Indices mirrored at the edges (..., 1, 0, 1, ... and ..., size-2, size-1, size-2, ...)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


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
INTENSITY_OPS = (rand_brightness, rand_contrast)  # joint mode: on the image channels only


def on_images(op, x, image_channels=None):
    """`op` on the first `image_channels` channels (None: all), the mask channels after them unchanged."""
    if image_channels is None or image_channels >= x.shape[1]:
        return op(x)
    return torch.cat([op(x[:, :image_channels]), x[:, image_channels:]], dim=1)


def diff_augment(x, policy: str, image_channels: int | None = None):
    """Apply the policy's ops in the order listed; empty policy = identity. Intensity ops touch only the
    first `image_channels` channels (joint mode's mask channels follow them; None = all are image)."""
    for name in (p.strip() for p in policy.split(",")):
        if not name:
            continue
        if name not in POLICIES:
            raise ValueError(f"train.diffaugment: unknown policy '{name}' (known: {', '.join(sorted(POLICIES))})")
        for op in POLICIES[name]:
            x = on_images(op, x, image_channels) if op in INTENSITY_OPS else op(x)
    return x


# --- ADA ------------------------------------------------------------------------------------------------
ADA_OPS = ("flip", "translation", "scale", "rotate", "color", "cutout")  # the order they are applied in
MAX_ROTATE_DEG = 10.0
SCALE_LOG2_STD = 0.1
NONDETERMINISTIC_ON_CUDA = ("scale", "rotate")  # grid_sample: no deterministic CUDA backward


def nondeterministic_ops(ops, device_type: str, deterministic: bool) -> tuple:
    """The ops of `ops` that torch refuses under deterministic algorithms on this device type (the
    module docstring): empty unless deterministic on CUDA."""
    if not deterministic or device_type != "cuda":
        return ()
    return tuple(op for op in ops if op in NONDETERMINISTIC_ON_CUDA)


def parse_ada_policy(policy: str, key: str = "train.ada_policy") -> tuple:
    """The op names of a comma list, checked; ValueError naming `key` otherwise."""
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [name for name in names if name not in ADA_OPS]
    if unknown:
        raise ValueError(f"{key}: unknown op '{unknown[0]}' (known: {', '.join(ADA_OPS)})")
    if not names:
        raise ValueError(f"{key}: empty; list some of {', '.join(ADA_OPS)}")
    return tuple(name for name in ADA_OPS if name in names)


def _chosen(x, probability):
    """(N, 1, 1, 1) bool: which images an op with this probability applies to."""
    return (torch.rand(x.shape[0], device=x.device) < probability).view(-1, 1, 1, 1)


def _sometimes(op, x, probability):
    """`op` on each image with this probability: which images is drawn first, then op's own numbers."""
    chosen = _chosen(x, probability)
    return torch.where(chosen, op(x), x)


def _affine(x, rotate: bool, scale: bool, p: float):
    """Rotation and isotropic scaling, each with probability p, in one bilinear resampling (float32,
    reflection padding). Images that get neither are returned untouched (not resampled)."""
    n, _, h, w = x.shape
    angle = torch.zeros(n, device=x.device)
    log_zoom = torch.zeros(n, device=x.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    if rotate:
        on = torch.rand(n, device=x.device) < p
        angle = torch.where(on, (torch.rand(n, device=x.device) * 2 - 1) * math.radians(MAX_ROTATE_DEG), angle)
        chosen |= on
    if scale:
        on = torch.rand(n, device=x.device) < p
        log_zoom = torch.where(on, torch.randn(n, device=x.device) * SCALE_LOG2_STD * math.log(2), log_zoom)
        chosen |= on
    # Output pixel -> input pixel (grid_sample's direction): rotate back by the angle, shrink by the zoom;
    # in normalised coordinates ([-1, 1] on each axis) the off-diagonal terms carry the aspect ratio.
    cos, sin, inv = angle.cos(), angle.sin(), torch.exp(-log_zoom)
    theta = torch.stack(
        [
            torch.stack([cos * inv, sin * inv * h / w, torch.zeros_like(cos)], dim=1),
            torch.stack([-sin * inv * w / h, cos * inv, torch.zeros_like(cos)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    warped = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return torch.where(chosen.view(-1, 1, 1, 1), warped.to(x.dtype), x)


def ada_augment(x, p: float, ops, image_channels: int | None = None):
    """Each op of `ops` (names from ADA_OPS) on each image with probability p, in ADA_OPS order; p = 0 is
    the identity and draws no random numbers. Geometric ops move every channel alike; color touches the
    first `image_channels` channels only (None = all)."""
    if p <= 0:
        return x
    if "flip" in ops:
        x = _sometimes(lambda x: x.flip(-1), x, p / 2)
    if "translation" in ops:
        x = _sometimes(lambda x: rand_translation(x, padding="reflection"), x, p)
    if "rotate" in ops or "scale" in ops:
        x = _affine(x, "rotate" in ops, "scale" in ops, p)
    if "color" in ops:
        for op in INTENSITY_OPS:
            x = _sometimes(lambda x, op=op: on_images(op, x, image_channels), x, p)
    if "cutout" in ops:
        x = _sometimes(rand_cutout, x, p)
    return x


def ada_adjust(p: float, r_t: float, target: float, images: int, speed_images: int, p_max: float = 1.0) -> float:
    """Karras et al.'s update: p moves by images / speed_images towards more augmentation when r_t is above
    the target (D overfits), towards less when below, and stays when equal (or r_t is NaN); in [0, p_max]."""
    direction = (r_t > target) - (r_t < target)
    return min(max(p + direction * images / speed_images, 0.0), p_max)


class AdaptiveAugment:
    """ADA's state on one rank: p (identical on every rank: it moves only by statistics summed over all
    of them) and this rank's sum of sign(D(real)) over the real images seen since the last adjustment.
    `observe` adds a step's signs (device tensors, no host copy); every `interval` D steps the caller
    sums (sign sum, count) over ranks and hands the totals to `adjust`."""

    def __init__(self, policy: str, target: float, interval: int, speed_images: int, p_max: float = 1.0):
        self.ops = parse_ada_policy(policy)
        self.target, self.interval, self.speed_images, self.p_max = target, interval, speed_images, p_max
        self.p = 0.0
        self.sign_sum, self.count = 0.0, 0

    def __call__(self, x, image_channels: int | None = None):
        return ada_augment(x, self.p, self.ops, image_channels)

    def observe(self, signs: torch.Tensor):
        self.sign_sum = self.sign_sum + signs.detach().sum(dtype=torch.float64)  # integers: exact
        self.count += signs.numel()

    def adjust(self, total_sign_sum: float, total_count: float) -> float:
        """One update from the totals over ranks since the last one; returns r_t and starts a new interval."""
        r_t = total_sign_sum / total_count if total_count else float("nan")
        self.p = ada_adjust(self.p, r_t, self.target, int(total_count), self.speed_images, self.p_max)
        self.sign_sum, self.count = 0.0, 0
        return r_t

    def local_totals(self) -> tuple:
        return float(self.sign_sum), self.count
