"""Mask plausibility: do generated label masks look like real ones, whatever the images beside them?

Masks are (N, H, W) integer labels 0..K-1, 0 background. Three statistics, each generated versus
real training masks, and the same for the real validation masks (the real-versus-real baseline):
  - class frequency: the fraction of pixels of each class over the whole set; distance: L1 between
    the two vectors (0..2).
  - components per slice: for each foreground class, the number of connected components
    (4-connectivity, scipy.ndimage.label) in each slice; distance: 1-D Wasserstein (W1) between the
    two sets of counts, divided by the mean real count (at least 1), so noise that breaks a class into
    hundreds of specks is far and a missing component is near.
  - component size: for each foreground class, log10 of each component's area as a fraction of the
    slice (so the figure does not depend on the resolution); distance: W1 in decades. A set with no
    component of the class counts as one component of one pixel's area, so a missing class is far
    from a real one in proportion to the real sizes (and two sets without it are at 0).
value = class-frequency L1 + mean over foreground classes of (components distance + size distance):
0 for identical sets, lower is better.
"""

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from hpcgan.errors import UsageError


def _masks(masks, name: str, num_classes: int) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype.kind not in "iub":
        raise UsageError(f"{name} masks: expected (N, H, W) integer labels, got {masks.dtype} {masks.shape}")
    if masks.size and (masks.min() < 0 or masks.max() >= num_classes):
        raise UsageError(
            f"{name} masks: labels {masks.min()}..{masks.max()} outside 0..{num_classes - 1} "
            f"(num_classes {num_classes})"
        )
    return masks.astype(np.int64, copy=False)


def class_frequency(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) fraction of pixels of each class (zeros for an empty set)."""
    counts = np.bincount(masks.ravel(), minlength=num_classes)[:num_classes].astype(np.float64)
    return counts / max(1.0, counts.sum())


def components(masks: np.ndarray, label: int):
    """(count per slice (N,), log10 area fraction of every component) of class `label`."""
    per_slice, areas = np.zeros(len(masks), np.int64), []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask == label)
        per_slice[i] = n
        if n:
            areas.append(np.bincount(labelled.ravel())[1:])
    pixels = masks.shape[1] * masks.shape[2]
    area = np.concatenate(areas) if areas else np.ones(1)  # none: one pixel's area (module docstring)
    return per_slice, np.log10(area / pixels)


def _stats(masks, num_classes):
    return class_frequency(masks, num_classes), {c: components(masks, c) for c in range(1, num_classes)}


def _compare(a, ref, num_classes) -> dict:
    """The distances of set `a` to the reference set `ref`, from their _stats."""
    freq_a, comp_a = a
    freq_r, comp_r = ref
    per_class = {}
    for c in range(1, num_classes):
        (count_a, area_a), (count_r, area_r) = comp_a[c], comp_r[c]
        scale = max(1.0, float(count_r.mean()))  # both sets hold slices (checked by the caller)
        per_class[str(c)] = {
            "components_per_slice": float(count_a.mean()),
            "components_distance": float(wasserstein_distance(count_a, count_r) / scale),
            "median_log10_area": float(np.median(area_a)),
            "size_distance": float(wasserstein_distance(area_a, area_r)),
        }
    l1 = float(np.abs(freq_a - freq_r).sum())
    terms = [d["components_distance"] + d["size_distance"] for d in per_class.values()]
    return {
        "value": l1 + (float(np.mean(terms)) if terms else 0.0),
        "class_frequency_l1": l1,
        "per_class": per_class,
    }


def compute_mask_plausibility(fake_masks, train_masks, num_classes: int, val_masks=None) -> dict:
    """{"value": distance of the generated masks to the training masks (lower is better; module
    docstring), "baseline": the same for the validation masks (None without them), "class_frequency":
    {"generated", "train", "val"}, "generated": details, "val": details}. JSON-able."""
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise UsageError(f"mask plausibility: num_classes must be at least 2, got {num_classes}")
    fake = _masks(fake_masks, "generated", num_classes)
    train = _masks(train_masks, "train", num_classes)
    if len(fake) == 0 or len(train) == 0:
        raise UsageError("mask plausibility: the generated and the training masks must not be empty")
    stats_train = _stats(train, num_classes)
    stats_fake = _stats(fake, num_classes)
    generated = _compare(stats_fake, stats_train, num_classes)
    out = {
        "value": generated["value"],
        "baseline": None,
        "num_classes": int(num_classes),
        "class_frequency": {"generated": stats_fake[0].tolist(), "train": stats_train[0].tolist()},
        "generated": generated,
    }
    if val_masks is not None and len(val_masks):
        val = _masks(val_masks, "val", num_classes)
        stats_val = _stats(val, num_classes)
        out["val"] = _compare(stats_val, stats_train, num_classes)
        out["baseline"] = out["val"]["value"]
        out["class_frequency"]["val"] = stats_val[0].tolist()
    return out
