"""Train on synthetic, test on real: are generated image+mask pairs useful to a segmentation network?

`task_evaluation` trains the same small U-Net three times under one fixed recipe and budget, on
  - "real": the real training pairs (the baseline),
  - "synthetic": as many synthetic pairs as there are real ones (a subset drawn from the recipe's
    seed; all of them, noted in the result, when there are fewer),
  - "real+synthetic": the union of the two,
and scores each on the real validation pairs by Dice per class (mean over the foreground classes).

The recipe (`SegmentationRecipe`, every field in the result):
  - network: a U-Net of len(widths) levels, default 16-32-64 channels: two 3x3 convolutions (no
    bias: the norm after them cancels it) with GroupNorm (8 groups) and ReLU per level, 2x2
    max-pooling down, 2x2 transposed convolutions up, skip connections, a 1x1 convolution to
    `num_classes` logits. GroupNorm, not BatchNorm: it has no batch statistics, so a batch split
    over ranks gives the gradients of the whole batch. The image side must be divisible by
    2**(len(widths) - 1) (64 and 256 are).
  - weights initialised from `seed` (PyTorch's default initialisation, drawn on the CPU: the same
    on every rank and every device).
  - Adam, lr 1e-3, default betas, no weight decay; `steps` steps (default 300) of a global batch of
    16 pairs. Batch of step s: drawn from (seed, s), without replacement when the set holds a batch,
    else with; each pair flipped left-right with probability 0.5 from the same generator. Every rank
    draws the whole global batch and trains on its contiguous share (batch divisible by the ranks).
  - loss: pixel-wise cross-entropy (mean over the batch's pixels) plus soft Dice loss (per image,
    1 - mean over foreground classes of (2 sum(p t) + 1) / (sum p + sum t + 1), mean over the batch).
    Both are means over images, so the sum over ranks of each rank's share (divided by the global
    batch) is the loss of the whole batch: one flat buffer of gradients is summed per step
    (Group.allreduce_sum) and 1 or N ranks train the same network up to float rounding (which
    Adam amplifies over the steps: about 1e-3 of Dice after 40 steps at 32², measured).
  - prediction: argmax of the logits; Dice per class over the whole validation set (`dice_per_class`).

Device: `device` (default the CPU) holds the networks, the data, every batch and the Dice counts;
the host sees only what crosses between ranks (the flat gradient buffer and the counts, as numpy:
Group.allreduce_sum) and the numbers of the result.

Data: images (N, C, H, W) float32 in [-1, 1]; masks (N, H, W) integer labels 0..K-1, 0 background.
"""

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcgan.errors import UsageError
from hpcgan.models.layers import eval_mode
from hpcgan.parallel.group import ONE_PROCESS

ARMS = ("real", "synthetic", "real+synthetic")
BASELINE = "real"
DICE_SMOOTH = 1.0  # of the soft Dice loss: keeps a class absent from an image and its prediction at loss 0


@dataclass(frozen=True)
class SegmentationRecipe:
    """The fixed recipe and budget of the downstream segmenter (see the module docstring)."""

    widths: tuple = (16, 32, 64)
    lr: float = 1e-3
    batch_size: int = 16
    steps: int = 300
    flip: bool = True
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))  # a YAML or JSON list becomes a tuple
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"segmentation.widths: expected positive integers, got {list(self.widths)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"segmentation.lr: expected a positive number, got {self.lr!r}")
        for key in ("batch_size", "steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"segmentation.{key}: expected a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"segmentation.seed: expected a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["widths"] = list(self.widths)
        return out


# ---------------------------------------------------------------- network


def _block(cin: int, cout: int) -> nn.Sequential:
    def norm(c):
        return nn.GroupNorm(math.gcd(8, c), c)  # 8 groups, fewer where the width is not a multiple

    # No bias before a norm: the norm cancels it, its gradient is rounding noise, and Adam would turn
    # that noise into steps of size lr that differ between 1 and N ranks.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """(N, in_channels, H, W) → (N, num_classes, H, W) logits; H and W divisible by `divisor`."""

    def __init__(self, in_channels: int, num_classes: int, widths=(16, 32, 64)):
        super().__init__()
        widths = tuple(widths)
        self.divisor = 2 ** (len(widths) - 1)
        self.down = nn.ModuleList(_block(cin, cout) for cin, cout in zip((in_channels, *widths[:-1]), widths))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2 or 1, 2, stride=2) for w in widths[:0:-1])
        # Each decoder level sees the upsampled features beside the encoder's skip features.
        self.merge = nn.ModuleList(_block((w // 2 or 1) + s, s) for w, s in zip(widths[:0:-1], widths[-2::-1]))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def check_side(self, height: int, width: int):
        if height % self.divisor or width % self.divisor:
            raise UsageError(
                f"segmentation: images of {height}x{width} pixels, but this U-Net of "
                f"{len(self.down)} levels needs sides divisible by {self.divisor}"
            )

    def forward(self, x):
        self.check_side(*x.shape[-2:])
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1]):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def build_model(in_channels: int, num_classes: int, recipe: SegmentationRecipe) -> UNet:
    """The recipe's U-Net, its weights drawn on the CPU from recipe.seed without touching the global
    RNG: the same network on every rank and device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return UNet(in_channels, num_classes, recipe.widths)


# ---------------------------------------------------------------- data checks


def _pairs(pairs, name: str, num_classes: int):
    """(images float32 tensor, masks int64 tensor) of an (images, masks) tuple; UsageError naming
    the set where shapes or labels are wrong."""
    try:
        images, masks = pairs
    except (TypeError, ValueError):
        raise UsageError(f"{name}: expected an (images, masks) pair") from None
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, np.float32))
    masks = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks).astype(np.int64))
    images, masks = images.float(), masks.long()
    if images.ndim != 4 or masks.ndim != 3 or len(images) != len(masks) or images.shape[2:] != masks.shape[1:]:
        raise UsageError(
            f"{name}: expected images (N, C, H, W) and masks (N, H, W) of the same N, H, W; "
            f"got {tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if len(masks) and (int(masks.min()) < 0 or int(masks.max()) >= num_classes):
        raise UsageError(
            f"{name}: mask labels {int(masks.min())}..{int(masks.max())} outside 0..{num_classes - 1} "
            f"(num_classes {num_classes})"
        )
    return images, masks


def _check_num_classes(num_classes):
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise UsageError(f"segmentation: num_classes must be at least 2 (background and one class), got {num_classes}")


# ---------------------------------------------------------------- training


def _global_batch(step: int, n: int, recipe: SegmentationRecipe):
    """(indices, flips) of the global batch of `step`: the same on every rank."""
    rng = np.random.default_rng([recipe.seed, step])
    indices = rng.choice(n, size=recipe.batch_size, replace=n < recipe.batch_size)
    flips = rng.random(recipe.batch_size) < 0.5 if recipe.flip else np.zeros(recipe.batch_size, bool)
    return indices, flips


def _loss_share(logits, target, num_classes: int, global_batch: int):
    """This rank's share of the batch loss: sums over its images divided by the global batch size,
    so the shares of all ranks add up to the loss of the whole batch."""
    pixels = target[0].numel()
    ce = F.cross_entropy(logits, target, reduction="sum") / (global_batch * pixels)
    probs = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter, total = (probs * onehot).sum((2, 3)), (probs + onehot).sum((2, 3))
    dice = ((2 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)).mean(1)  # per image, mean over foreground
    return ce + (1 - dice).sum() / global_batch


def train_segmenter(
    images, masks, num_classes: int, recipe: SegmentationRecipe, group=ONE_PROCESS, progress=None, device=None
) -> UNet:
    """The recipe's U-Net trained on (images, masks), data-parallel over the ranks of `group` (every
    rank passes the same data and gets the same network), on `device` (a torch.device; default the
    images' device when they are a tensor, else the CPU). `progress`: a tqdm-like bar, updated by 1 per step."""
    _check_num_classes(num_classes)
    images, masks = _pairs((images, masks), "training pairs", num_classes)
    if len(images) == 0:
        raise UsageError("segmentation: no training pairs")
    if recipe.batch_size % group.world_size:
        raise UsageError(
            f"segmentation.batch_size: {recipe.batch_size} is not divisible by the {group.world_size} ranks"
        )
    device = torch.device(device) if device is not None else images.device
    model = build_model(images.shape[1], num_classes, recipe)
    model.check_side(*images.shape[2:])
    model.to(device).train()
    images, masks = images.to(device), masks.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    share = recipe.batch_size // group.world_size
    mine = slice(group.rank * share, (group.rank + 1) * share)
    for step in range(recipe.steps):
        indices, flips = _global_batch(step, len(images), recipe)
        index = torch.from_numpy(indices[mine]).to(device)
        x, y = images[index], masks[index]
        flip = torch.from_numpy(flips[mine]).to(device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None], y.flip(-1), y)
        optimizer.zero_grad(set_to_none=False)
        _loss_share(model(x), y, num_classes, recipe.batch_size).backward()
        if group.world_size > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params]).cpu().numpy()
            summed = torch.from_numpy(group.allreduce_sum(flat)).to(device)
            offset = 0
            for p in params:
                p.grad.copy_(summed[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        optimizer.step()
        if progress is not None:
            progress.update(1)
    return model.eval()


@torch.no_grad()
def predict_labels(model: nn.Module, images, batch_size: int = 64) -> torch.Tensor:
    """(N, H, W) int64 labels on `model`'s device: argmax of its logits, in batches on that device."""
    device = next(model.parameters()).device
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, np.float32))
    with eval_mode(model):
        out = [
            model(images[i : i + batch_size].to(device).float()).argmax(1) for i in range(0, len(images), batch_size)
        ]
    return torch.cat(out) if out else torch.zeros((0, *images.shape[2:]), dtype=torch.int64, device=device)


def predict(model: nn.Module, images, batch_size: int = 64) -> np.ndarray:
    """predict_labels as numpy (N, H, W) int64, for callers outside the task."""
    return predict_labels(model, images, batch_size).cpu().numpy()


# ---------------------------------------------------------------- Dice


def dice_counts(pred, target, num_classes: int) -> np.ndarray:
    """(3, K) float64: per class |A∩B|, |A| (predicted pixels) and |B| (true pixels). Integer counts,
    so the counts of parts of a set add up to those of the set, exactly."""
    return _label_counts(torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(target)), num_classes).numpy()


def _label_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """dice_counts of label tensors, computed and returned (float64) on their device."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise UsageError(f"dice: predicted and true masks differ in size ({pred.numel()} vs {target.numel()} pixels)")
    k = num_classes
    both = torch.bincount(target[pred == target], minlength=k)[:k]
    return torch.stack([both, torch.bincount(pred, minlength=k)[:k], torch.bincount(target, minlength=k)[:k]]).double()


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """(K,) Dice 2|A∩B| / (|A| + |B|) per class; NaN for a class in neither A nor B (no evidence
    either way: left out of means, null in JSON)."""
    inter, a, b = counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(a + b > 0, 2 * inter / (a + b), np.nan)


def dice_per_class(pred, target, num_classes: int) -> np.ndarray:
    """(K,) Dice per class over the whole set (pixels of every image pooled, not a mean of per-image
    Dice). A class absent from both the prediction and the truth is NaN and left out of means."""
    return dice_from_counts(dice_counts(pred, target, num_classes))


def mean_foreground_dice(dice: np.ndarray) -> float | None:
    """Mean Dice of the classes 1..K-1 that are defined (not NaN); None when none is."""
    foreground = np.asarray(dice, np.float64)[1:]
    foreground = foreground[~np.isnan(foreground)]
    return float(foreground.mean()) if foreground.size else None


def dice_counts_over_ranks(model, images, masks, num_classes: int, group, batch_size: int) -> np.ndarray:
    """dice_counts of the model's predictions over the whole set, each rank predicting a contiguous
    part on the model's device and the integer counts summed over ranks: the same on every rank."""
    bounds = np.linspace(0, len(images), group.world_size + 1).astype(int)
    part = slice(bounds[group.rank], bounds[group.rank + 1])
    pred = predict_labels(model, images[part], batch_size)
    counts = _label_counts(pred, masks[part].to(pred.device), num_classes).cpu().numpy()  # MPI sums numpy
    return group.allreduce_sum(counts) if group.world_size > 1 else counts


# ---------------------------------------------------------------- the three arms


def synthetic_subset(n_synth: int, n_real: int, seed: int) -> np.ndarray:
    """Indices of the synthetic pairs the synthetic arms train on: as many as there are real pairs, a
    subset seeded by (seed, n_synth) in the stored order; all of them when there are fewer."""
    if n_synth < n_real:
        return np.arange(n_synth)
    return np.sort(np.random.default_rng([seed, n_synth]).choice(n_synth, n_real, replace=False))


def _json_floats(values) -> list:
    return [None if math.isnan(v) else float(v) for v in values]


def task_evaluation(
    real_train,
    synth,
    real_val,
    num_classes: int,
    recipe: SegmentationRecipe | None = None,
    group=ONE_PROCESS,
    progress=None,
    device=None,
) -> dict:
    """Train the three arms (module docstring) and score them on `real_val`; each argument is an
    (images, masks) pair. Every rank of `group` calls it with the same arguments and gets the same
    JSON-able dict: {"recipe", "num_classes", "arms": {arm: {"dice": [per class, null where
    undefined], "mean_dice": mean foreground Dice, "train_pairs", "seconds"}}, "baseline": "real",
    "value": mean_dice of "synthetic", "seconds", "notes"}. `device`: a torch.device for the networks,
    data and counts (default the CPU). `progress` gets 1 per training step (3 × recipe.steps in all)."""
    recipe = recipe or SegmentationRecipe()
    _check_num_classes(num_classes)
    start = time.perf_counter()
    real_train = _pairs(real_train, "real training pairs", num_classes)
    synth = _pairs(synth, "synthetic pairs", num_classes)
    real_val = _pairs(real_val, "real validation pairs", num_classes)
    shape = tuple(real_train[0].shape[1:])
    for name, (images, _) in (("synthetic pairs", synth), ("real validation pairs", real_val)):
        if tuple(images.shape[1:]) != shape:
            raise UsageError(f"{name}: images are {tuple(images.shape[1:])} but the real training images are {shape}")
    if len(real_val[0]) == 0:
        raise UsageError("real validation pairs: none (the arms are scored on them)")
    n_real, n_synth = len(real_train[0]), len(synth[0])
    notes = []
    if n_synth < n_real:
        notes.append(f"only {n_synth} synthetic pairs for {n_real} real: the synthetic arms use all of them")
    chosen = synthetic_subset(n_synth, n_real, recipe.seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    real_train, real_val = (tuple(t.to(device) for t in pair) for pair in (real_train, real_val))
    chosen = torch.from_numpy(chosen).to(device)
    synth = synth[0].to(device)[chosen], synth[1].to(device)[chosen]
    data = {
        "real": real_train,
        "synthetic": synth,
        "real+synthetic": (torch.cat([real_train[0], synth[0]]), torch.cat([real_train[1], synth[1]])),
    }
    arms = {}
    for arm in ARMS:
        arm_start = time.perf_counter()
        model = train_segmenter(*data[arm], num_classes, recipe, group, progress, device)
        counts = dice_counts_over_ranks(model, *real_val, num_classes, group, recipe.batch_size * 4)
        dice = dice_from_counts(counts)
        arms[arm] = {
            "dice": _json_floats(dice),
            "mean_dice": mean_foreground_dice(dice),
            "train_pairs": len(data[arm][0]),
            "seconds": time.perf_counter() - arm_start,
        }
    result = {
        "recipe": recipe.to_dict(),
        "num_classes": int(num_classes),
        "image_shape": list(shape),
        "ranks": group.world_size,
        "val_pairs": len(real_val[0]),
        "arms": arms,
        "baseline": BASELINE,
        "value": arms["synthetic"]["mean_dice"],
        "seconds": time.perf_counter() - start,
        "notes": notes,
    }
    # The Dice figures agree on every rank already; rank 0's timings make the whole dict agree.
    return group.broadcast_object(result if group.is_root else None)
