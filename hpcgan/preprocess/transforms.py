"""Small pure array functions that turn one NIfTI volume into square 2-D training slices.

Order of use (see `hpcgan.preprocess.command.process_subject`): reorient to RAS → select axial
slices → normalise to [-1, 1] → orient slices for display → pad to a square field of view in mm
→ anti-aliased resize → replicate channels → encode for storage. No torch here: a preprocessing
rank stays small in memory (numpy, nibabel, h5py only).
"""
import numpy as np

# ---------------------------------------------------------------- geometry


def reorient_to_ras(volume: np.ndarray, affine: np.ndarray):
    """Reorder and flip axes to the closest canonical (RAS+) orientation, as
    `nibabel.as_closest_canonical` does. Returns (view of the volume, new affine). The third
    axis of the result is the axial (inferior → superior) axis."""
    from nibabel import orientations

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


def axial_to_image(slab: np.ndarray) -> np.ndarray:
    """(X, Y, S) RAS slab → (S, H, W) images, anterior at the top and the subject's right on
    the right (neurological view): rows run along -Y, columns along +X."""
    return np.ascontiguousarray(np.transpose(slab[:, ::-1, :], (2, 1, 0)))


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


def pad_images(images: np.ndarray, padding, fill) -> np.ndarray:
    """Pad (S, H, W) images with a constant (background) value."""
    (top, bottom), (left, right) = padding
    if not (top or bottom or left or right):
        return images
    return np.pad(images, ((0, 0), (top, bottom), (left, right)), constant_values=fill)


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
    return weights.astype(np.float32)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased resize of (S, H, W) float images to (S, size, size): one matrix product per
    axis, which is separable linear filtering."""
    rows = resize_weights(images.shape[1], size)
    cols = resize_weights(images.shape[2], size)
    return np.matmul(np.matmul(rows, images), cols.T)


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (S, H, W) label maps (labels must never be blended)."""
    rows = np.minimum(((np.arange(size) + 0.5) * labels.shape[1] / size).astype(int), labels.shape[1] - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * labels.shape[2] / size).astype(int), labels.shape[2] - 1)
    return labels[:, rows[:, None], cols[None, :]]


# ---------------------------------------------------------------- slice selection


def foreground_fraction(foreground: np.ndarray) -> np.ndarray:
    """Fraction of foreground voxels in each axial slice of an (X, Y, Z) boolean volume."""
    return foreground.mean(axis=(0, 1))


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


def percentile_range(volume: np.ndarray, low_pct: float, high_pct: float):
    """Source intensities at the given percentiles of the non-zero voxels."""
    values = volume[volume != 0]
    lo, hi = np.percentile(values, [low_pct, high_pct])
    return float(lo), float(hi)


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
    Returns float32."""
    span = hi - lo if hi > lo else 1.0
    out = (images.astype(np.float32) - np.float32(lo)) * np.float32(2.0 / span) - np.float32(1.0)
    np.clip(out, -1.0, 1.0, out=out)
    if background is not None:
        out[background] = -1.0
    return out


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
