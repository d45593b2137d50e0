"""Small pure array functions that turn one NIfTI volume into square 2-D training slices.

Order of use (see `hpcgan.preprocess.subject.process_subject`): reorient to RAS → take axial
slices as a view oriented for display → normalise to [-1, 1] → pad to a square field of view in
mm and resize with anti-aliasing (one step) → replicate channels → encode for storage. No torch
here: a preprocessing rank stays small in memory (numpy, nibabel, h5py only).
"""

import functools

import numpy as np

# ---------------------------------------------------------------- geometry


def reorient_to_ras(volume: np.ndarray, affine: np.ndarray):
    """Reorder and flip axes to the closest canonical (RAS+) orientation, as
    `nibabel.as_closest_canonical` does. Returns (view of the volume, new affine). The third
    axis of the result is the axial (inferior → superior) axis."""
    from nibabel import orientations  # here, not above: training imports this module (hpcgan.data)

    ornt = orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return volume, affine
    ras_volume = orientations.apply_orientation(volume, ornt)
    ras_affine = affine @ orientations.inv_ornt_aff(ornt, volume.shape[:3])
    return ras_volume, ras_affine


def ras_shape_and_spacing(shape, affine):
    """Shape and voxel sizes (mm) a volume will have after `reorient_to_ras`, from its header
    alone (no voxel data read)."""
    from nibabel import orientations

    ornt = orientations.io_orientation(affine)
    order = ornt[:, 0].astype(int)  # input axis i goes to output axis order[i]
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    out_shape, out_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for i in range(3):
        out_shape[order[i]] = int(shape[i])
        out_spacing[order[i]] = float(spacing[i])
    return tuple(out_shape), tuple(out_spacing)


def axial_slab(volume: np.ndarray, indices) -> np.ndarray:
    """(X, Y, len(indices)) axial slices of an (X, Y, Z) volume: a view (no copy) when the
    indices are consecutive, as they usually are."""
    indices = np.asarray(indices)
    if len(indices) and np.array_equal(indices, np.arange(indices[0], indices[0] + len(indices))):
        return volume[:, :, indices[0] : indices[0] + len(indices)]
    return volume[:, :, indices]


def axial_view(slab: np.ndarray) -> np.ndarray:
    """(X, Y, S) RAS slab → (S, H, W) view, anterior at the top and the subject's right on the
    right (neurological view): rows run along -Y, columns along +X."""
    return slab[:, ::-1, :].transpose(2, 1, 0)


def axial_to_image(slab: np.ndarray) -> np.ndarray:
    """`axial_view` as a contiguous array."""
    return np.ascontiguousarray(axial_view(slab))


def square_fov_padding(height: int, width: int, spacing_hw, fov_mm: float):
    """Pixels to add ((top, bottom), (left, right)) so that the slice covers `fov_mm` in both
    directions. Anisotropic pixels need different counts per axis; the resize then makes them
    square."""
    pads = []
    for n, mm in ((height, spacing_hw[0]), (width, spacing_hw[1])):
        target = max(n, int(round(fov_mm / mm)))
        extra = target - n
        pads.append((extra // 2, extra - extra // 2))
    return tuple(pads)


@functools.lru_cache(maxsize=64)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of a linear (triangle) filter that is widened by the scale factor
    when shrinking, so downsampling averages instead of aliasing (as PIL and torch's
    `interpolate(..., antialias=True)` do). Rows sum to 1 and are non-negative, so values in
    [-1, 1] stay in [-1, 1]."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # filter half-width in input pixels
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    src = np.arange(n_in)
    weights = np.clip(1.0 - np.abs(src[None, :] - centres[:, None]) / support, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    weights = weights.astype(np.float32)
    weights.flags.writeable = False  # cached and shared: every volume of a cohort has the same sizes
    return weights


def _span(mask: np.ndarray):
    """(first, last + 1) of the True entries; (0, 0) when there are none."""
    where = np.flatnonzero(mask)
    return (int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0)


@functools.lru_cache(maxsize=256)
def resize_taps(n_padded: int, size: int, first: int, count: int):
    """The rows of `resize_weights(n_padded, size)` as taps on the `count` real pixels that start
    at padded position `first` (the padding around them is zero and adds nothing). Returns
    (o0, o1, index, taps): output rows o0..o1 are the ones those pixels reach; for tap t, output
    o0 + i takes pixel index[t, i] (local to the real pixels) with weight taps[t, i]. Taps run in
    ascending pixel order; rows with fewer taps than the longest are filled with weight 0."""
    weights = resize_weights(n_padded, size)[:, first : first + count]
    o0, o1 = _span(weights.any(axis=1))
    nonzero = weights[o0:o1] > 0  # one run of pixels per row: the filter is a triangle
    starts = nonzero.argmax(axis=1)
    stops = count - nonzero[:, ::-1].argmax(axis=1)
    index = starts[:, None] + np.arange(int((stops - starts).max()))
    inside = index < stops[:, None]
    index = np.minimum(index, count - 1)
    taps = np.where(inside, np.take_along_axis(weights[o0:o1], index, axis=1), np.float32(0.0))
    index, taps = np.ascontiguousarray(index.T), np.ascontiguousarray(taps.T, dtype=np.float32)
    index.flags.writeable = taps.flags.writeable = False  # cached and shared
    return o0, o1, index, taps


def _resize_axis(images: np.ndarray, axis: int, index: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Sum over taps t of taps[t] * images[index[t]] along `axis`, added in tap order with
    elementwise numpy operations (each correctly rounded). The bytes of the result then depend
    only on the pixels, never on BLAS, its thread count or the CPU: a matrix product sums in an
    order that changes with threads and kernels (1 vs 2 BLAS threads moved some float16 pixels by
    one step)."""
    shape = [1] * images.ndim
    shape[axis] = -1
    out = np.take(images, index[0], axis=axis)
    out *= taps[0].reshape(shape)
    term = np.empty_like(out)
    for t in range(1, len(index)):
        np.take(images, index[t], axis=axis, out=term)
        term *= taps[t].reshape(shape)
        out += term
    return out


def pad_and_resize(images: np.ndarray, padding, size: int) -> np.ndarray:
    """(S, H, W) float images in [-1, 1] with background -1 → padded with background by
    `padding` ((top, bottom), (left, right)) and resized with anti-aliasing to (S, size, size).

    Works on images + 1, where the background is 0: padding then adds nothing, and only the
    bounding box of the foreground and the output pixels it reaches need arithmetic. Weight rows
    sum to 1, so resize(x + 1) - 1 = resize(x). The taps that the crop drops are exact zeros, and
    adding zero changes no bit: a slice gives the same bytes whatever block it is resized in."""
    (top, bottom), (left, right) = padding
    n, height, width = images.shape
    foreground = images.max(axis=0) > -1.0  # (H, W): one pass over the images
    r0, r1 = _span(foreground.any(axis=1))
    c0, c1 = _span(foreground.any(axis=0))
    out = np.full((n, size, size), -1.0, dtype=np.float32)
    if r1 > r0 and c1 > c0:
        o0, o1, row_index, row_taps = resize_taps(height + top + bottom, size, top + r0, r1 - r0)
        p0, p1, col_index, col_taps = resize_taps(width + left + right, size, left + c0, c1 - c0)
        shifted = images[:, r0:r1, c0:c1] + np.float32(1.0)
        block = _resize_axis(_resize_axis(shifted, 1, row_index, row_taps), 2, col_index, col_taps)
        block -= np.float32(1.0)
        np.clip(block, -1.0, 1.0, out=out[:, o0:o1, p0:p1])
    return out


def pad_and_resize_labels(labels: np.ndarray, padding, size: int) -> np.ndarray:
    """Nearest-neighbour counterpart of `pad_and_resize` for (S, H, W) label maps (labels are
    never blended); padding is label 0."""
    out = labels
    for axis, n, (before, after) in ((1, labels.shape[1], padding[0]), (2, labels.shape[2], padding[1])):
        padded = n + before + after
        source = np.floor((np.arange(size) + 0.5) * padded / size).astype(np.int64) - before
        inside = (source >= 0) & (source < n)
        out = np.take(out, np.clip(source, 0, n - 1), axis=axis)
        if not inside.all():
            index = [slice(None)] * 3
            index[axis] = ~inside
            out[tuple(index)] = 0
    return out


# ---------------------------------------------------------------- label sets

# Classes of a label set are 0..K-1, 0 the background; a generator's one-hot mask has K channels.
MAX_MASK_CLASSES = 32
OTHER_LABELS = "*"  # a label map's key for every non-zero source label it does not name


def parse_label_map(text: str) -> dict:
    """'1=1,2=1,4=2' (BraTS: necrosis and oedema -> 1, enhancing -> 2) → {1: 1, 2: 1, 4: 2}; '*=1' maps
    every other non-zero label (e.g. all atlas regions -> one tissue class). Source 0 is always the
    background, class 0. The classes used must be 1..K-1 without gaps. ValueError on anything else."""
    mapping = {}
    for item in (p.strip() for p in str(text).split(",") if p.strip()):
        source, sep, target = item.partition("=")
        try:
            key = OTHER_LABELS if source.strip() == OTHER_LABELS else int(source)
            value = int(target)
        except ValueError:
            key = value = None
        if not sep or key is None or (key != OTHER_LABELS and key < 0) or value < 0:
            raise ValueError(f"label_map: expected SOURCE=CLASS pairs such as 1=1,2=1,4=2 or *=1, got {item!r}")
        if key in mapping:
            raise ValueError(f"label_map: label {key} is mapped twice")
        if key == 0 and value != 0:
            raise ValueError("label_map: source label 0 is the background and stays class 0")
        mapping[key] = value
    classes = sorted(set(mapping.values()) - {0})
    if not classes:
        raise ValueError(f"label_map: maps no label to a class >= 1 ({text!r})")
    if classes != list(range(1, len(classes) + 1)):
        raise ValueError(f"label_map: the classes must be 1..K-1 without gaps, got {classes}")
    if len(classes) + 1 > MAX_MASK_CLASSES:
        raise ValueError(f"label_map: at most {MAX_MASK_CLASSES - 1} classes besides the background")
    return mapping


def remap_labels(labels: np.ndarray, mapping: dict):
    """(classes as uint8, sorted source labels present that `mapping` does not cover). Background 0 stays 0;
    with OTHER_LABELS every other non-zero label takes its class."""
    present = np.unique(labels)
    table_keys = present.astype(np.int64)
    other = mapping.get(OTHER_LABELS)
    missing = [int(v) for v in table_keys if v != 0 and int(v) not in mapping and other is None]
    lookup = np.array([0 if v == 0 else mapping.get(int(v), other or 0) for v in table_keys], dtype=np.uint8)
    classes = lookup[np.searchsorted(present, labels)] if labels.size else labels.astype(np.uint8)
    return classes, missing


# ---------------------------------------------------------------- slice selection


def foreground_fraction(volume: np.ndarray, threshold=None) -> np.ndarray:
    """Fraction of foreground voxels in each axial slice of an (X, Y, Z) volume: non-zero
    voxels, or voxels above `threshold` (CT)."""
    foreground = volume if threshold is None else volume > threshold
    return np.count_nonzero(foreground, axis=(0, 1)) / float(volume.shape[0] * volume.shape[1])


def select_slices(fractions: np.ndarray, slice_range=None, min_fraction: float = 0.0) -> np.ndarray:
    """Axial indices inside `slice_range` ((start, stop), clipped to the volume) whose
    foreground fraction is at least `min_fraction`."""
    start, stop = slice_range if slice_range else (0, len(fractions))
    indices = np.arange(max(start, 0), min(stop, len(fractions)))
    return indices[fractions[indices] >= min_fraction] if min_fraction > 0 else indices


def parse_slice_range(text: str):
    """'60:108' → (60, 108). Raises ValueError on anything else."""
    start, sep, stop = str(text).partition(":")
    if not sep:
        raise ValueError(f"slices: expected START:STOP such as 60:108, got {text!r}")
    start, stop = int(start or 0), int(stop) if stop else 1 << 30
    if start < 0 or stop <= start:
        raise ValueError(f"slices: need 0 <= START < STOP, got {text!r}")
    return start, stop


# ---------------------------------------------------------------- intensity


def nan_to_background(volume: np.ndarray, zero_is_background: bool = True) -> np.ndarray:
    """NaN voxels (what resampling leaves outside a volume's field of view) → the background of the
    normalisation that follows: 0 where zero voxels are background (MRI's percentile and z-score, which
    leave zeros out of their statistics and map them to -1; masks, whose label 0 is background), else
    the volume's lowest finite value (CT: air, below any window, so -1 as well); 0 for a volume with no
    finite value. The volume itself when it holds no NaN, else a new array of its dtype."""
    if volume.dtype.kind != "f":
        return volume
    nan = np.isnan(volume)
    if not nan.any():
        return volume
    fill = 0.0
    if not zero_is_background and not nan.all():
        fill = float(np.min(volume, where=~nan, initial=np.inf))
    out = np.array(volume)  # a writable copy: the voxels read from a file may be read-only
    out[nan] = fill
    return out


def _small_int_codes(volume: np.ndarray):
    """Unsigned view of an 8- or 16-bit integer volume (its values as table indices), else None."""
    if volume.dtype.kind in "iu" and volume.dtype.itemsize <= 2:
        return volume.view(np.dtype(f"u{volume.dtype.itemsize}"))
    return None


def _code_values(dtype) -> np.ndarray:
    """The value of every code of an 8- or 16-bit integer dtype."""
    dtype = np.dtype(dtype)
    return np.arange(1 << (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}").view(dtype)


def value_counts(codes: np.ndarray) -> np.ndarray:
    """Histogram of the codes of an 8/16-bit volume, counted slab by slab along the last axis
    (bincount widens its input to int64: per slab that stays small)."""
    counts = np.zeros(1 << (8 * codes.dtype.itemsize), dtype=np.int64)
    step = max(1, (1 << 21) // max(1, codes[..., 0].size))
    for k in range(0, codes.shape[-1], step):
        counts += np.bincount(codes[..., k : k + step].ravel(order="K"), minlength=len(counts))
    return counts


def percentile_range(volume: np.ndarray, low_pct: float, high_pct: float):
    """Source intensities at the given percentiles of the non-zero voxels (numpy's linear
    interpolation; exact from a histogram for 8/16-bit integer volumes)."""
    codes = _small_int_codes(volume)
    if codes is None:
        lo, hi = np.percentile(volume[volume != 0], [low_pct, high_pct])
        return float(lo), float(hi)
    values = _code_values(volume.dtype)
    counts = value_counts(codes)
    counts[values == 0] = 0
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order].astype(np.float64), np.cumsum(counts[order])
    n = int(cumulative[-1])
    out = []
    for pct in (low_pct, high_pct):
        position = pct / 100.0 * (n - 1)
        below = int(np.floor(position))
        v0 = values[np.searchsorted(cumulative, below, side="right")]
        v1 = values[np.searchsorted(cumulative, min(below + 1, n - 1), side="right")]
        out.append(float(v0 + (position - below) * (v1 - v0)))
    return out[0], out[1]


def zscore_range(volume: np.ndarray, clip_sigma: float):
    """mean ∓ clip_sigma·std of the non-zero voxels: the intensities that map to -1 and +1."""
    values = volume[volume != 0].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    return mean - clip_sigma * std, mean + clip_sigma * std


def ct_window_range(level: float, width: float):
    """A CT window in HU: level ∓ width/2."""
    return level - width / 2.0, level + width / 2.0


def scale_to_unit(images: np.ndarray, lo: float, hi: float, background=None) -> np.ndarray:
    """Map [lo, hi] linearly to [-1, 1] and clip; voxels where `background` is True become -1.
    Returns a new contiguous float32 array (the input may be a strided view)."""
    span = hi - lo if hi > lo else 1.0
    out = np.empty(images.shape, dtype=np.float32)
    np.subtract(images, np.float32(lo), out=out, dtype=np.float32, casting="unsafe")
    out *= np.float32(2.0 / span)
    out -= np.float32(1.0)
    np.clip(out, -1.0, 1.0, out=out)
    if background is not None:
        out[background] = -1.0
    return out


def normalise(images: np.ndarray, lo: float, hi: float, zero_is_background: bool) -> np.ndarray:
    """`scale_to_unit` with zero voxels as background (MRI) or not (CT). 8/16-bit integer
    images go through a lookup table of every possible value: one gather instead of
    arithmetic on every voxel."""
    codes = _small_int_codes(images)
    if codes is None:
        return scale_to_unit(images, lo, hi, images == 0 if zero_is_background else None)
    values = _code_values(images.dtype)
    table = scale_to_unit(values, lo, hi, values == 0 if zero_is_background else None)
    return table[codes]


# ---------------------------------------------------------------- channels and storage


def replicate_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(S, 1, H, W) → (S, channels, H, W), as studies that feed MRI to RGB networks do."""
    return np.repeat(images, channels, axis=1) if images.shape[1] != channels else images


def encode(images: np.ndarray, dtype: str) -> np.ndarray:
    """[-1, 1] float → stored dtype. uint8 keeps round((x + 1) · 127.5)."""
    if dtype == "uint8":
        return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return images.astype(np.float16)


def decode(stored: np.ndarray) -> np.ndarray:
    """Stored shard pixels → float32 in [-1, 1]."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return stored.astype(np.float32)
