"""One subject's volumes → encoded axial slices: the chain of pure functions in
`hpcgan.preprocess.transforms`, run by whichever rank writes the subject's shard."""

import os

import numpy as np

from hpcgan.preprocess import transforms as T
from hpcgan.preprocess.config import PreprocessConfig
from hpcgan.preprocess.nifti import BadInput, load_volume, nifti_stem

BLOCK_SLICES = 32  # slices transformed at a time: bounds the float32 temporaries


def file_label(cfg: PreprocessConfig, modality: str, path: str) -> str:
    """How messages and records name an input file: its base name, or with --pseudonymize its
    role ("t1 volume"), since file names usually carry the patient's name."""
    return f"{modality} volume" if cfg.pseudonymize else os.path.basename(path)


def source_files(cfg: PreprocessConfig, sid: str, files: dict, digests: dict) -> dict:
    """{modality: {file, sha256}}; with --pseudonymize the file name carries the pseudonym."""
    out = {}
    for modality, path in sorted(files.items()):
        name = os.path.basename(path)
        if cfg.pseudonymize:
            name = f"{sid}_{modality}{name[len(nifti_stem(path)) :]}"
        out[modality] = {"file": name, "sha256": digests[modality]}
    return out


def intensity_range(cfg: PreprocessConfig, volume: np.ndarray):
    if cfg.norm == "percentile":
        return T.percentile_range(volume, *cfg.percentiles)
    if cfg.norm == "zscore":
        return T.zscore_range(volume, cfg.zscore_clip)
    return T.ct_window_range(cfg.ct_level, cfg.ct_width)


def process_subject(cfg: PreprocessConfig, sid: str, files: dict, fov_mm: float, mask_dtype: str = "uint16"):
    """Load, check and transform one subject. Returns (slice indices, encoded images
    (S, C, size, size), masks (S, size, size) or None, info): info holds "intensity" {modality: [lo, hi]},
    "digests" {modality: sha256} and, with a mask, "mask_labels": the source labels in its selected slices."""
    volumes, digests, spacing = [], {}, None
    ct = cfg.norm == "ct-window"
    for modality in cfg.modalities:
        data, affine, digests[modality] = load_volume(
            sid,
            files[modality],
            file_label(cfg, modality, files[modality]),
            cfg.volume_index,
            nan_as_background=cfg.nan_as_background,
            zero_is_background=not ct,
        )
        data, affine = T.reorient_to_ras(data, affine)
        volumes.append((modality, data))
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ranges = {modality: intensity_range(cfg, data) for modality, data in volumes}

    # Slices are chosen on the union of all modalities' foreground (non-zero, or above the CT window).
    fractions = np.max([T.foreground_fraction(data, ranges[m][0] if ct else None) for m, data in volumes], axis=0)
    slice_range = T.parse_slice_range(cfg.slices) if cfg.slices else None
    indices = T.select_slices(fractions, slice_range, cfg.min_brain_fraction)
    nx, ny = volumes[0][1].shape[:2]
    padding = T.square_fov_padding(ny, nx, (spacing[1], spacing[0]), fov_mm)

    encoded = np.empty((len(indices), cfg.num_channels, cfg.size, cfg.size), dtype=cfg.dtype)
    for start in range(0, len(indices), BLOCK_SLICES):
        block = indices[start : start + BLOCK_SLICES]
        channels = [
            T.pad_and_resize(
                T.normalise(T.axial_view(T.axial_slab(data, block)), *ranges[m], not ct), padding, cfg.size
            )
            for m, data in volumes
        ]
        images = channels[0][:, None] if len(channels) == 1 else np.stack(channels, axis=1)
        images = T.replicate_channels(images, cfg.num_channels)
        encoded[start : start + len(block)] = T.encode(images, cfg.dtype)
    del volumes

    masks = None
    if cfg.mask:
        mask_label = file_label(cfg, cfg.mask, files[cfg.mask])
        data, affine, digests[cfg.mask] = load_volume(
            sid,
            files[cfg.mask],
            mask_label,
            cfg.volume_index,
            allow_all_zero=True,
            nan_as_background=cfg.nan_as_background,
        )
        data, _ = T.reorient_to_ras(data, affine)
        labels = T.axial_view(T.axial_slab(data, indices))
        limit = np.iinfo(mask_dtype).max
        if labels.size and (labels.min() < 0 or labels.max() > limit):
            raise BadInput(sid, f"{mask_label}: mask labels outside 0..{limit}")
        if labels.dtype.kind == "f":
            labels = np.rint(labels)
        source_labels = [int(v) for v in np.unique(labels)]
        if cfg.label_map:
            labels, missing = T.remap_labels(labels, T.parse_label_map(cfg.label_map))
            if missing:
                shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
                raise BadInput(sid, f"{mask_label}: mask labels {shown} are not in --label-map {cfg.label_map}")
        masks = T.pad_and_resize_labels(labels, padding, cfg.size).astype(mask_dtype, copy=False)
    info = {"intensity": {m: [float(lo), float(hi)] for m, (lo, hi) in ranges.items()}, "digests": digests}
    if cfg.mask:
        info["mask_labels"] = source_labels
    return indices, encoded, masks, info
