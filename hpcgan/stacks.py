"""Image stacks on disk: PNG contact sheets, HDF5 stacks, NIfTI volumes. Pure functions; every
file appears atomically (hpcgan.io.atomic_path).

Images are (N, C, H, W) float in [-1, 1], as the generator makes them and as preprocessing
stores them: axial slices in RAS, anterior at the top and the subject's right on the right
(neurological view), i.e. rows run along -Y and columns along +X
(`hpcgan.preprocess.transforms.axial_to_image`). `write_stack_nifti` inverts that mapping."""

import glob
import json
import os

import numpy as np

from hpcgan.errors import UsageError
from hpcgan.io import HDF5Output, atomic_path

STACK_DATASET = "images"
MASK_DATASET = "masks"  # joint image + mask models: (N, H, W) integer classes
# Outline colours of mask classes 1, 2, ... on contact sheets (RGB; class 0, the background, has none).
OUTLINE_COLOURS = np.array(
    [[255, 64, 64], [64, 255, 64], [64, 128, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], dtype=np.uint8
)
# A NIfTI's descrip (80 bytes at most): each slice of a stack comes from its own latent.
NIFTI_DESCRIPTION = b"hpcgan synthetic: independent 2-D slices, not a volume or a patient"


def to_uint8(images) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] → (N, H, W, C) uint8, round((x + 1) · 127.5) as preprocessing encodes."""
    images = np.asarray(images, dtype=np.float32)
    pixels = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def mask_outlines(masks) -> np.ndarray:
    """(N, H, W) classes → (N, H, W) class of each pixel on the border of its class region (a 4-neighbour
    has another class), else 0: the outline drawn over an image."""
    masks = np.asarray(masks)
    border = np.zeros(masks.shape, dtype=bool)
    border[:, 1:, :] |= masks[:, 1:, :] != masks[:, :-1, :]
    border[:, :-1, :] |= masks[:, :-1, :] != masks[:, 1:, :]
    border[:, :, 1:] |= masks[:, :, 1:] != masks[:, :, :-1]
    border[:, :, :-1] |= masks[:, :, :-1] != masks[:, :, 1:]
    return np.where(border, masks, 0)


def contact_sheet(images, nrow: int = 10, masks=None) -> np.ndarray:
    """Tile N images, `nrow` per row, into one uint8 picture (H·rows, W·nrow[, C]). One channel
    stays grey (2-D result), three are RGB; other channel counts show their first channel in grey.
    With `masks` ((N, H, W) classes) the sheet is RGB with each class's outline drawn in its colour
    (OUTLINE_COLOURS). Cells past the last image are black."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    if c != 3:
        pixels = pixels[..., :1]
    if masks is not None:
        pixels = np.repeat(pixels, 3 // pixels.shape[-1], axis=-1)
        outline = mask_outlines(masks)
        drawn = outline > 0
        pixels[drawn] = OUTLINE_COLOURS[(outline[drawn] - 1) % len(OUTLINE_COLOURS)]
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    sheet = np.zeros((rows * h, cols * w, pixels.shape[-1]), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        sheet[r * h : (r + 1) * h, q * w : (q + 1) * w] = pixels[i]
    return sheet[..., 0] if sheet.shape[-1] == 1 else sheet


def write_png(array, path, compress_level: int | None = None):
    """uint8 (H, W) grey or (H, W, 3) RGB → PNG, atomically, with no metadata chunks. `compress_level`
    0 stores the pixels uncompressed: every image of one shape then has the same file size."""
    from PIL import Image

    options = {} if compress_level is None else {"compress_level": compress_level}
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", **options)


def write_stack_h5(path, images, attrs: dict, masks=None):
    """One stack → HDF5 dataset `images` (N, C, H, W) float32 in [-1, 1] and, from a joint model,
    `masks` (N, H, W) uint8 classes. `attrs` become attributes of `images`; dicts and lists are stored
    as JSON strings (e.g. `config`)."""
    images = np.asarray(images, dtype=np.float32)
    with atomic_path(path) as tmp, HDF5Output(tmp) as f:
        if masks is not None:
            f.create_dataset(
                MASK_DATASET, data=np.asarray(masks, dtype=np.uint8), chunks=(1, *images.shape[2:]), compression="gzip"
            )
        ds = f.create_dataset(
            STACK_DATASET,
            data=images,
            chunks=(1, *images.shape[1:]),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
        )
        for key, value in attrs.items():
            ds.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else value


def read_stack_h5(path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f[STACK_DATASET][...]


def read_stack_masks(path):
    """The stack's `masks` (N, H, W) int64, or None (a stack of an image-only model)."""
    import h5py

    with h5py.File(path, "r") as f:
        return f[MASK_DATASET][...].astype(np.int64) if MASK_DATASET in f else None


def read_stack_attrs(path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f[STACK_DATASET].attrs.items()}


def images_to_ras(images: np.ndarray) -> np.ndarray:
    """(N, H, W) display slices → (X, Y, N) RAS volume: the inverse of
    `hpcgan.preprocess.transforms.axial_to_image` (rows along -Y, columns along +X)."""
    return np.ascontiguousarray(np.transpose(images, (2, 1, 0))[:, ::-1, :])


def intensity_ranges(intensity, channels: int) -> list:
    """Per-channel (lo, hi) that [-1, 1] maps back to. `intensity` is a (lo, hi) pair, a list of
    per-channel pairs, or a dataset manifest's `intensity` dict ({lo, hi, per_modality}; with one
    entry per channel in per_modality the channels are those modalities, in order), or None
    (values stay in [-1, 1])."""
    if intensity is None:
        return [(-1.0, 1.0)] * channels
    if isinstance(intensity, dict):
        per = [v for v in (intensity.get("per_modality") or {}).values()]
        if len(per) == channels and all(isinstance(v, dict) for v in per):
            return [(float(v["lo"]), float(v["hi"])) for v in per]
        return [(float(intensity["lo"]), float(intensity["hi"]))] * channels
    pairs = list(intensity)
    if len(pairs) == 2 and all(isinstance(v, (int, float)) for v in pairs):
        return [(float(pairs[0]), float(pairs[1]))] * channels
    if len(pairs) != channels:
        raise ValueError(f"intensity: {len(pairs)} ranges for {channels} channels")
    return [(float(lo), float(hi)) for lo, hi in pairs]


def write_stack_nifti(path, images, pixel_spacing_mm, slice_thickness_mm, intensity, all_channels: bool = False):
    """One stack (N, C, H, W) in [-1, 1] → a NIfTI volume, atomically.

    The stack index is the third (S) axis: shape (W, H, N) = (X, Y, stack), i.e. the training
    slices put back in RAS (see `images_to_ras`), so the slices display upright in 3D Slicer,
    ITK-SNAP and FSLeyes. With `all_channels` the result is 4-D (X, Y, stack, C), else only the first
    channel is written. Values go from [-1, 1] back to the training intensity range
    (`intensity_ranges`), float32. The affine is diag(column spacing, row spacing, slice thickness)
    in mm, RAS, centred on the origin; the header carries no free text from any input (aux_file,
    intent_name, db_name empty; descrip is NIFTI_DESCRIPTION, which tells a viewer's user that the
    slices are independent samples, not a patient), qform/sform code 1 (scanner), xyz units mm."""
    images = np.asarray(images, dtype=np.float32)
    channels = images.shape[1] if all_channels else 1
    ranges = intensity_ranges(intensity, images.shape[1])
    volumes = []
    for c in range(channels):
        lo, hi = ranges[c]
        values = lo + (np.clip(images[:, c], -1.0, 1.0) + 1.0) * np.float32((hi - lo) / 2.0)
        volumes.append(images_to_ras(values.astype(np.float32)))
    data = volumes[0] if channels == 1 else np.stack(volumes, axis=-1)
    shown = ranges[:channels]  # the display window spans them
    low, high = min(r[0] for r in shown), max(r[1] for r in shown)
    save_nifti(path, data, pixel_spacing_mm, slice_thickness_mm, np.float32, low, high)


def write_mask_nifti(path, masks, pixel_spacing_mm, slice_thickness_mm):
    """A stack's masks (N, H, W) classes → an integer (uint8) NIfTI label volume with the geometry of the
    image stack's (`write_stack_nifti`), which 3D Slicer and ITK-SNAP open as a label map over it."""
    masks = np.asarray(masks).astype(np.uint8)
    save_nifti(path, images_to_ras(masks), pixel_spacing_mm, slice_thickness_mm, np.uint8, 0, masks.max(initial=0))


def save_nifti(path, data, pixel_spacing_mm, slice_thickness_mm, dtype, cal_min, cal_max):
    """(X, Y, stack[, C]) RAS data → NIfTI, atomically: the affine is diag(column spacing, row spacing, slice
    thickness) in mm, centred on the origin; the header carries no free text from any input."""
    import nibabel as nib

    spacing = np.array([pixel_spacing_mm[1], pixel_spacing_mm[0], slice_thickness_mm], dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(data.shape[:3]) - 1) / 2.0 * spacing  # volume centre at (0, 0, 0)
    image = nib.Nifti1Image(data, affine)
    header = image.header
    for key in ("aux_file", "intent_name", "db_name"):
        header[key] = b""
    header["descrip"] = NIFTI_DESCRIPTION
    header.set_xyzt_units(xyz="mm")
    header["cal_min"], header["cal_max"] = cal_min, cal_max
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    header.set_data_dtype(dtype)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def read_samples(samples_dir, limit=None, with_masks=False):
    """(images, provenance) from every stack-*.h5 in a sample directory, in stack order; with
    `with_masks`, (images, masks or None, provenance): masks are there when every stack has them."""
    if not os.path.isdir(samples_dir):
        raise UsageError(f"{samples_dir}: no such samples directory")
    paths = sorted(glob.glob(os.path.join(samples_dir, "stack-*.h5")))
    if not paths:
        raise UsageError(f"{samples_dir}: no stack-*.h5 files (write them with hpcgan sample --format h5)")
    stacks = []
    for path in paths:
        try:
            stacks.append(read_stack_h5(path))
        except (OSError, KeyError) as exc:
            raise UsageError(f"{path}: not a readable image stack ({exc})") from None
    shapes = {tuple(s.shape[1:]) for s in stacks}
    if len(shapes) > 1 or stacks[0].ndim != 4:
        raise UsageError(f"{samples_dir}: stacks of different or non-(N, C, H, W) shapes ({sorted(shapes)})")
    images = np.concatenate(stacks)[:limit]
    masks = [read_stack_masks(path) for path in paths] if with_masks else []
    masks = np.concatenate(masks)[:limit] if masks and all(m is not None for m in masks) else None
    attrs = read_stack_attrs(paths[0])
    provenance = {
        "source": "samples",
        "stacks": len(paths),
        **{
            k: attrs[k].item() if hasattr(attrs[k], "item") else attrs[k]
            for k in ("checkpoint_sha256", "step", "seed")
            if k in attrs
        },
    }  # numpy scalars → JSON numbers
    return (images, masks, provenance) if with_masks else (images, provenance)
