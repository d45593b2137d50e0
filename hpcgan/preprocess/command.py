"""Turn a cohort of NIfTI volumes into a sharded HDF5 training dataset.

Input files are named <subject>_<modality>.nii[.gz], one folder per subject (BraTS layout) or
all in one folder, or chosen by a glob (quote it). Each volume is reoriented to RAS, its axial
slices are selected, normalised to [-1, 1] (background -1), padded to a square field of view in
millimetres and resized with anti-aliasing. Subjects are split into train/val by subject.

Runs as one process or under `mpirun -np N` / `srun`: shards are divided among ranks and the
output is the same whatever N. Re-running the same command resumes (finished shards whose
checksums match are kept); a different config needs --overwrite. Every option can also be set
in a YAML file (--config), with the option names as keys (dashes or underscores); flags win.

example:
  hpcgan preprocess --input data/brats --output datasets/brats-t1 --modalities t1 \\
      --mask seg --slices 60:108 --size 256 --shards 8
  mpirun -np 4 hpcgan preprocess --config preprocess.yaml
"""
import argparse
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from hpcgan import __version__
from hpcgan.config import build, read_yaml, resolve_config_path, to_dict
from hpcgan.errors import HpcganError, UsageError
from hpcgan.io import atomic_path, check_writable_dir, sha256_file, write_json_atomic
from hpcgan.log import get_logger
from hpcgan.progress import progress_bar
from hpcgan.preprocess import transforms as T
from hpcgan.preprocess.io import (BadInput, check_same_grid, group_by_subject, list_input_files, load_volume,
                                  nifti_stem, read_header)
from hpcgan.preprocess.shards import SHARD_PATTERN, SUBJECT_ID_BYTES, ShardWriter, shard_name

FORMAT = "hpcgan-dataset"
FORMAT_VERSION = 1
PARTS_DIR = ".parts"  # per-shard records (resume) and the plan fingerprint
# Keys that name places on disk or how to treat an existing output: never part of the
# dataset's identity, and paths never reach the manifest.
NOT_IN_MANIFEST = ("input", "output", "salt_file", "overwrite")
NOT_IN_FINGERPRINT = NOT_IN_MANIFEST + ("skip_bad",)


@dataclass
class PreprocessConfig:
    input: str = ""
    output: str = ""
    modalities: list[str] = field(default_factory=lambda: ["t1"])
    mask: str | None = None
    slices: str | None = None
    min_brain_fraction: float = 0.1
    size: int = 256
    channels: int | None = None
    norm: Literal["percentile", "zscore", "ct-window"] = "percentile"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    zscore_clip: float = 3.0
    ct_level: float = 40.0
    ct_width: float = 80.0
    volume_index: int | None = None
    shards: int = 8
    val_fraction: float = 0.1
    seed: int = 0
    dtype: Literal["float16", "uint8"] = "float16"
    compression: Literal["none", "lzf", "gzip"] = "none"
    chunk_slices: int = 32
    pseudonymize: bool = False
    salt_file: str | None = None
    skip_bad: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if not self.input:
            raise ValueError("'input' is required (--input DIR_OR_GLOB)")
        if not self.output:
            raise ValueError("'output' is required (--output DATASET_DIR)")
        if not self.modalities:
            raise ValueError("'modalities' needs at least one modality")
        if len(set(self.modalities)) != len(self.modalities) or self.mask in self.modalities:
            raise ValueError("'modalities' and 'mask' must name different modalities")
        if self.size not in (32, 64, 128, 256, 512):
            raise ValueError(f"'size' must be a power of two from 32 to 512, got {self.size}")
        n = len(self.modalities)
        if self.channels is not None and self.channels != n and not (n == 1 and self.channels == 3):
            raise ValueError(f"'channels' must be {n} (one per modality) or 3 with one modality, got {self.channels}")
        if self.slices is not None:
            T.parse_slice_range(self.slices)
        if not 0.0 <= self.min_brain_fraction < 1.0:
            raise ValueError("'min_brain_fraction' must be in [0, 1)")
        if len(self.percentiles) != 2 or not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError(f"'percentiles' must be two values 0 <= low < high <= 100, got {self.percentiles}")
        if self.zscore_clip <= 0 or self.ct_width <= 0:
            raise ValueError("'zscore_clip' and 'ct_width' must be positive")
        if self.shards < 1 or self.chunk_slices < 1:
            raise ValueError("'shards' and 'chunk_slices' must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"'val_fraction' must be in [0, 1), got {self.val_fraction}")
        if self.volume_index is not None and self.volume_index < 0:
            raise ValueError("'volume_index' must be >= 0")
        if self.pseudonymize and not self.salt_file:
            raise ValueError("'pseudonymize' needs 'salt_file' (--salt-file FILE: a private file holding the salt, "
                             "created if missing; keep it outside the dataset)")

    @property
    def num_channels(self) -> int:
        return self.channels or len(self.modalities)


DEFAULTS = PreprocessConfig(input="-", output="-")


def add_arguments(parser):
    d = DEFAULTS
    S = argparse.SUPPRESS  # only flags given on the command line override the YAML file
    parser.add_argument("--config", default=None, help="YAML file with any of the keys below (flags override it)")
    parser.add_argument("--input", default=S, help="input directory (searched recursively) or a quoted glob")
    parser.add_argument("--output", default=S, help="dataset directory to write (created if needed)")
    parser.add_argument("--modalities", default=S,
                        help=f"comma-separated modalities, stacked as channels in this order (default: {','.join(d.modalities)})")
    parser.add_argument("--mask", default=S, help="modality holding a segmentation/mask, stored as `masks` (default: none)")
    parser.add_argument("--slices", default=S, help="axial slice range START:STOP after reorientation to RAS, e.g. 60:108 "
                                                    "(default: all slices passing --min-brain-fraction)")
    parser.add_argument("--min-brain-fraction", type=float, default=S,
                        help=f"keep slices with at least this fraction of non-zero voxels (default: {d.min_brain_fraction})")
    parser.add_argument("--size", type=int, default=S, help=f"output size in pixels, 32..512, power of two (default: {d.size})")
    parser.add_argument("--channels", type=int, default=S,
                        help="output channels: one per modality (default), or 3 to replicate a single modality")
    parser.add_argument("--norm", default=S, help=f"percentile | zscore | ct-window (default: {d.norm})")
    parser.add_argument("--percentiles", default=S,
                        help=f"LOW,HIGH percentiles of non-zero voxels mapped to -1,+1 (default: {d.percentiles[0]},{d.percentiles[1]})")
    parser.add_argument("--zscore-clip", type=float, default=S,
                        help=f"z-score: +-this many standard deviations map to +-1 (default: {d.zscore_clip})")
    parser.add_argument("--ct-level", type=float, default=S, help=f"CT window level in HU (default: {d.ct_level})")
    parser.add_argument("--ct-width", type=float, default=S, help=f"CT window width in HU (default: {d.ct_width})")
    parser.add_argument("--volume-index", type=int, default=S, help="which volume of 4-D images to use (default: refuse 4-D)")
    parser.add_argument("--shards", type=int, default=S,
                        help=f"training shards (default: {d.shards}); validation gets shards x val-fraction, at least 1; "
                             "never more shards than subjects")
    parser.add_argument("--val-fraction", type=float, default=S,
                        help=f"fraction of subjects held out for validation (default: {d.val_fraction})")
    parser.add_argument("--seed", type=int, default=S, help=f"seed of the train/val split (default: {d.seed})")
    parser.add_argument("--dtype", default=S, help=f"stored pixel type: float16 | uint8 (default: {d.dtype})")
    parser.add_argument("--compression", default=S, help=f"none | lzf | gzip (default: {d.compression}; "
                                                         "compression slows random reads in training)")
    parser.add_argument("--chunk-slices", type=int, default=S, help=f"HDF5 chunk length along N (default: {d.chunk_slices})")
    parser.add_argument("--pseudonymize", action="store_true", default=S,
                        help="store salted hashes instead of subject names (needs --salt-file)")
    parser.add_argument("--salt-file", default=S, help="private file with the pseudonymisation salt; created if missing")
    parser.add_argument("--skip-bad", action="store_true", default=S,
                        help="skip bad subjects (listed in the manifest's `skipped`) instead of stopping")
    parser.add_argument("--overwrite", action="store_true", default=S, help="replace an existing dataset in --output")


def load_preprocess_config(args) -> PreprocessConfig:
    """defaults < YAML file (--config) < flags given on the command line."""
    data, source = {}, "command line"
    if args.config:
        path = resolve_config_path(args.config)
        data, source = {k.replace("-", "_"): v for k, v in read_yaml(path).items()}, os.fspath(path)
    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(PreprocessConfig)}}
    data.update(flags)
    return build(PreprocessConfig, data, source)


# ---------------------------------------------------------------- planning (rank 0)


def read_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def fingerprint(cfg: PreprocessConfig, subjects: dict, salt: str) -> str:
    """Identity of a dataset: config (without paths) and the input files' names, sizes and
    modification times. A re-run with the same fingerprint may resume."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_FINGERPRINT}
    files = []
    for subject in subjects.values():
        for modality, path in sorted(subject.files.items()):
            st = os.stat(path)
            files.append([subject.name, modality, os.path.basename(path), st.st_size, st.st_mtime_ns])
    text = repr((FORMAT_VERSION, sorted(config.items()), files, hashlib.sha256(salt.encode()).hexdigest()))
    return hashlib.sha256(text.encode()).hexdigest()


def read_salt(path: str) -> str:
    if not os.path.exists(path):
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        os.chmod(path, 0o600)
    try:
        with open(path) as f:
            salt = f.read().strip()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read salt file ({exc.strerror})") from None
    if len(salt) < 16:
        raise UsageError(f"{path}: salt file holds fewer than 16 characters")
    return salt


def pseudonym(name: str, salt: str) -> str:
    return "sub-" + hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()[:16]


def file_label(cfg: PreprocessConfig, modality: str, path: str) -> str:
    """How messages and records name an input file: its base name, or with --pseudonymize its
    role ("t1 volume"), since file names usually carry the patient's name."""
    return f"{modality} volume" if cfg.pseudonymize else os.path.basename(path)


def split_subjects(ids: list, val_fraction: float, seed: int) -> dict:
    """{id: 'train'|'val'} in the seed's shuffled order (the order shards are filled in, so
    that patterns in subject names do not pile similar subjects into one shard or rank), split
    by subject and reproducible from the seed. At least one subject is held out when
    val_fraction > 0 and there are two or more subjects."""
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_val = int(round(val_fraction * len(ids)))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    return {sid: ("val" if i < n_val else "train") for i, sid in enumerate(order)}


def assign_shards(split_ids: list, n_shards: int, split: str) -> list:
    """Subjects → shards round-robin in a fixed order: independent of the number of ranks."""
    count = min(n_shards, len(split_ids))
    return [{"name": shard_name(split, j, count), "split": split, "subjects": split_ids[j::count]} for j in range(count)]


def shards_of_rank(shards: list, rank: int, world_size: int) -> list:
    """The shards rank `rank` writes: largest first, each to the least-loaded rank (counted in
    subjects), so ranks finish together. Only who writes a shard depends on the number of
    ranks, never what is in it."""
    loads, mine = [0] * world_size, []
    for j in sorted(range(len(shards)), key=lambda j: (-len(shards[j]["subjects"]), j)):
        least = loads.index(min(loads))
        loads[least] += len(shards[j]["subjects"])
        if least == rank:
            mine.append(shards[j])
    return mine


def make_plan(cfg: PreprocessConfig) -> dict:
    log = get_logger("preprocess")
    out = check_writable_dir(cfg.output)
    wanted = list(cfg.modalities) + ([cfg.mask] if cfg.mask else [])
    subjects = group_by_subject(list_input_files(cfg.input), wanted)
    if not subjects:
        raise UsageError(f"--input: no NIfTI volumes named <subject>_<modality>.nii[.gz] for modalities "
                         f"{', '.join(wanted)}")
    salt = read_salt(cfg.salt_file) if cfg.pseudonymize else ""
    skipped, good, grids, byte_labels = [], {}, {}, True
    for name, subject in subjects.items():
        sid = pseudonym(name, salt) if cfg.pseudonymize else name
        try:
            if len(sid.encode()) > SUBJECT_ID_BYTES:
                raise BadInput(sid, f"subject id longer than {SUBJECT_ID_BYTES} bytes")
            missing = [m for m in wanted if m not in subject.files]
            if missing:
                raise BadInput(sid, f"missing modality {', '.join(missing)} (found: {', '.join(sorted(subject.files))})")
            if subject.duplicates:
                m, others = min(subject.duplicates.items())
                paths = [subject.files[m], *others]
                raise BadInput(sid, f"{len(paths)} files for modality {m}" +
                               ("" if cfg.pseudonymize else f" ({', '.join(map(os.path.basename, paths))})"))
            headers = {m: read_header(sid, subject.files[m], file_label(cfg, m, subject.files[m]), cfg.volume_index)
                       for m in wanted}
            check_same_grid(sid, headers)
        except BadInput as exc:
            if not cfg.skip_bad:
                raise
            log.warning("skipping %s", exc)
            skipped.append({"subject": sid, "reason": exc.reason})
            continue
        good[sid] = subject
        grids[sid] = T.ras_shape_and_spacing(headers[wanted[0]].shape, headers[wanted[0]].affine)
        byte_labels = byte_labels and (not cfg.mask or headers[cfg.mask].byte_labels)
    if not good:
        raise UsageError("no usable subject left after skipping bad ones")
    if len(set(good)) != len(good):
        raise UsageError("two subjects map to the same id")

    # One field of view for the whole dataset, so every pixel has the same size in mm.
    fov_mm = max(max(shape[0] * spacing[0], shape[1] * spacing[1]) for shape, spacing in grids.values())
    splits = split_subjects(sorted(good), cfg.val_fraction, cfg.seed)
    shards = []
    for split, n_shards in (("train", cfg.shards), ("val", max(1, int(round(cfg.shards * cfg.val_fraction))))):
        shards += assign_shards([s for s in splits if splits[s] == split], n_shards, split)
    plan = {
        "fingerprint": fingerprint(cfg, good, salt),
        "fov_mm": float(fov_mm),
        "slice_thickness_mm": float(np.median([spacing[2] for _, spacing in grids.values()])),
        "mask_dtype": "uint8" if byte_labels else "uint16",  # from the headers: the same for every shard
        "subjects": {sid: {"files": s.files, "split": splits[sid]} for sid, s in good.items()},
        "shards": shards,
        "skipped": skipped,
    }
    prepare_output(cfg, out, plan["fingerprint"])
    return plan


def dataset_files(out: str) -> list:
    """Our own files in an output directory: shards, their temporaries, manifest, records."""
    names = []
    for name in os.listdir(out):
        stem = name[1:].split(".h5.")[0] + ".h5" if name.startswith(".") and ".h5." in name else name
        if SHARD_PATTERN.match(stem) or name in ("manifest.json", PARTS_DIR) or name.startswith(".manifest.json."):
            names.append(name)
    return names


def prepare_output(cfg: PreprocessConfig, out: str, fp: str):
    """Refuse to mix configs; clear for --overwrite; drop temporaries of an interrupted run;
    record the fingerprint that finished shards will be checked against."""
    ours = dataset_files(out)
    plan_path = os.path.join(out, PARTS_DIR, "plan.json")
    if ours:
        old = (read_json(plan_path) if os.path.exists(plan_path) else {}).get("fingerprint")
        if old != fp and not cfg.overwrite:
            raise UsageError(f"{out}: holds a dataset made with a different config or input; "
                             "pass --overwrite to replace it")
        for name in ours:
            path = os.path.join(out, name)
            if cfg.overwrite or (name.startswith(".") and name != PARTS_DIR):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(os.path.join(out, PARTS_DIR), exist_ok=True)
    write_json_atomic(plan_path, {"fingerprint": fp})


# ---------------------------------------------------------------- one subject


def intensity_range(cfg: PreprocessConfig, volume: np.ndarray):
    if cfg.norm == "percentile":
        return T.percentile_range(volume, *cfg.percentiles)
    if cfg.norm == "zscore":
        return T.zscore_range(volume, cfg.zscore_clip)
    return T.ct_window_range(cfg.ct_level, cfg.ct_width)


BLOCK_SLICES = 32  # slices transformed at a time: bounds the float32 temporaries


def process_subject(cfg: PreprocessConfig, sid: str, files: dict, fov_mm: float, mask_dtype: str = "uint16"):
    """Load, check and transform one subject. Returns (slice indices, encoded images
    (S, C, size, size), masks (S, size, size) or None, {modality: [lo, hi]}, {modality: sha256})."""
    volumes, digests, spacing = [], {}, None
    for modality in cfg.modalities:
        data, affine, digests[modality] = load_volume(sid, files[modality], file_label(cfg, modality, files[modality]),
                                                      cfg.volume_index)
        data, affine = T.reorient_to_ras(data, affine)
        volumes.append((modality, data))
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ranges = {modality: intensity_range(cfg, data) for modality, data in volumes}

    # Slices are chosen on the union of all modalities' foreground (non-zero, or above the CT window).
    ct = cfg.norm == "ct-window"
    fractions = np.max([T.foreground_fraction(data, ranges[m][0] if ct else None) for m, data in volumes], axis=0)
    slice_range = T.parse_slice_range(cfg.slices) if cfg.slices else None
    indices = T.select_slices(fractions, slice_range, cfg.min_brain_fraction)
    nx, ny = volumes[0][1].shape[:2]
    padding = T.square_fov_padding(ny, nx, (spacing[1], spacing[0]), fov_mm)

    encoded = np.empty((len(indices), cfg.num_channels, cfg.size, cfg.size), dtype=cfg.dtype)
    for start in range(0, len(indices), BLOCK_SLICES):
        block = indices[start:start + BLOCK_SLICES]
        channels = [T.pad_and_resize(T.normalise(T.axial_view(T.axial_slab(data, block)), *ranges[m], not ct),
                                     padding, cfg.size) for m, data in volumes]
        images = channels[0][:, None] if len(channels) == 1 else np.stack(channels, axis=1)
        images = T.replicate_channels(images, cfg.num_channels)
        encoded[start:start + len(block)] = T.encode(images, cfg.dtype)
    del volumes

    masks = None
    if cfg.mask:
        mask_label = file_label(cfg, cfg.mask, files[cfg.mask])
        data, affine, digests[cfg.mask] = load_volume(sid, files[cfg.mask], mask_label, cfg.volume_index,
                                                      allow_all_zero=True)
        data, _ = T.reorient_to_ras(data, affine)
        labels = T.axial_view(T.axial_slab(data, indices))
        limit = np.iinfo(mask_dtype).max
        if labels.size and (labels.min() < 0 or labels.max() > limit):
            raise BadInput(sid, f"{mask_label}: mask labels outside 0..{limit}")
        if labels.dtype.kind == "f":
            labels = np.rint(labels)
        masks = T.pad_and_resize_labels(labels, padding, cfg.size).astype(mask_dtype, copy=False)
    return indices, encoded, masks, {m: [float(lo), float(hi)] for m, (lo, hi) in ranges.items()}, digests


# ---------------------------------------------------------------- one shard (any rank)


def shard_is_finished(out: str, shard: dict, fp: str):
    """The record of a shard finished by an earlier run with the same fingerprint whose file
    still has the recorded checksum; else None."""
    path, record_path = os.path.join(out, shard["name"]), os.path.join(out, PARTS_DIR, shard["name"] + ".json")
    if not (os.path.exists(path) and os.path.exists(record_path)):
        return None
    record = read_json(record_path)
    if record.get("fingerprint") != fp or record.get("sha256") != sha256_file(path):
        return None
    return record


def source_files(cfg: PreprocessConfig, sid: str, subject: dict, digests: dict) -> dict:
    """{modality: {file, sha256}}; with --pseudonymize the file name carries the pseudonym."""
    out = {}
    for modality, path in sorted(subject["files"].items()):
        name = os.path.basename(path)
        if cfg.pseudonymize:
            name = f"{sid}_{modality}{name[len(nifti_stem(path)):]}"
        out[modality] = {"file": name, "sha256": digests[modality]}
    return out


def write_shard(cfg: PreprocessConfig, plan: dict, shard: dict, progress) -> dict:
    out = cfg.output
    log = get_logger("preprocess")
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "split": shard["split"],
             "modalities": list(cfg.modalities), "norm": cfg.norm,
             "norm_params": {"percentiles": cfg.percentiles, "zscore_clip": cfg.zscore_clip,
                             "ct_level": cfg.ct_level, "ct_width": cfg.ct_width},
             "pixel_spacing_mm": [plan["fov_mm"] / cfg.size] * 2}
    subjects, skipped = {}, []
    path = os.path.join(out, shard["name"])
    with atomic_path(path) as tmp:
        writer = ShardWriter(tmp, cfg.num_channels, cfg.size, cfg.dtype, plan["mask_dtype"] if cfg.mask else None,
                             cfg.compression, cfg.chunk_slices, attrs)
        try:
            for sid in shard["subjects"]:
                subject = plan["subjects"][sid]
                try:
                    indices, images, masks, ranges, digests = process_subject(
                        cfg, sid, subject["files"], plan["fov_mm"], plan["mask_dtype"])
                except BadInput as exc:
                    if not cfg.skip_bad:
                        raise
                    log.warning("skipping %s", exc)
                    skipped.append({"subject": sid, "reason": exc.reason})
                    progress(0)
                    continue
                writer.append(sid, indices, images, masks)
                subjects[sid] = {"split": shard["split"], "shard": shard["name"], "slices": len(indices),
                                 "slice_indices": [int(i) for i in indices], "intensity": ranges,
                                 "files": source_files(cfg, sid, subject, digests)}
                progress(len(indices))
        finally:
            writer.close({"intensity": {sid: s["intensity"] for sid, s in subjects.items()}})
    record = {"fingerprint": plan["fingerprint"], "name": shard["name"], "split": shard["split"],
              "slices": sum(s["slices"] for s in subjects.values()), "sha256": sha256_file(path),
              "subjects": subjects, "skipped": skipped}
    write_json_atomic(os.path.join(out, PARTS_DIR, shard["name"] + ".json"), record)
    return record


# ---------------------------------------------------------------- manifest (rank 0)


def build_manifest(cfg: PreprocessConfig, plan: dict, records: list) -> dict:
    subjects, skipped = {}, list(plan["skipped"])
    order = {shard["name"]: shard["subjects"] for shard in plan["shards"]}
    for record in records:
        subjects.update(record["subjects"])
        skipped += record["skipped"]
    splits = {}
    for split in ("train", "val"):
        mine = [r for r in records if r["split"] == split]
        splits[split] = {"slices": sum(r["slices"] for r in mine), "shards": [r["name"] for r in mine],
                         "subjects": sum(len(r["subjects"]) for r in mine)}
    per_modality = {}
    for modality in cfg.modalities:
        los = [s["intensity"][modality][0] for s in subjects.values()]
        his = [s["intensity"][modality][1] for s in subjects.values()]
        per_modality[modality] = {"lo": float(np.median(los)), "hi": float(np.median(his))} if los else None
    first = per_modality[cfg.modalities[0]] or {"lo": 0.0, "hi": 0.0}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hpcgan_version": __version__,
        "fingerprint": plan["fingerprint"],
        "config": {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_MANIFEST},
        "image_shape": [cfg.num_channels, cfg.size, cfg.size],
        "dtype": cfg.dtype,
        "modalities": list(cfg.modalities),
        "mask": cfg.mask,
        "has_masks": bool(cfg.mask),
        "fov_mm": plan["fov_mm"],
        "pixel_spacing_mm": [plan["fov_mm"] / cfg.size] * 2,
        "slice_thickness_mm": plan["slice_thickness_mm"],
        "intensity": {"norm": cfg.norm, "lo": first["lo"], "hi": first["hi"], "per_modality": per_modality},
        "splits": splits,
        # Subjects in the order the shard holds them: a record read back from disk (a kept shard)
        # has its keys sorted, so the order comes from the plan, the same for a fresh and a resumed run.
        "shards": [{k: r[k] for k in ("name", "split", "slices", "sha256")} |
                   {"subjects": [sid for sid in order[r["name"]] if sid in r["subjects"]]} for r in records],
        "subjects": dict(sorted(subjects.items())),
        "skipped": skipped,
    }


# ---------------------------------------------------------------- the command


def _raise_everywhere(rank: int, error):
    """Raise the same failure on every rank; only rank 0 prints it (others exit quietly)."""
    kind, message = error
    if rank != 0:
        raise SystemExit(2 if kind == "usage" else 1)
    raise (UsageError if kind == "usage" else HpcganError)(message)


def run(args):
    from hpcgan.dist import launch_env, mpi_comm
    from hpcgan.dist.waiting import idle_barrier

    cfg = load_preprocess_config(args)
    log = get_logger("preprocess")
    comm = mpi_comm() if launch_env().world_size > 1 else None
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)

    plan, error = None, None
    if rank == 0:
        try:
            plan = make_plan(cfg)
        except HpcganError as exc:
            error = ("usage" if isinstance(exc, UsageError) else "runtime", str(exc))
    if comm is not None:
        idle_barrier(comm)  # the other ranks sleep while rank 0 plans
        plan, error = comm.bcast((plan, error), root=0)
    if error:
        _raise_everywhere(rank, error)
    train = [s for s in plan["shards"] if s["split"] == "train"]
    log.info("%d subjects (%d train, %d val) in %d shards on %d rank(s); field of view %.1f mm -> %.3f mm pixels",
             len(plan["subjects"]), sum(len(s["subjects"]) for s in train),
             sum(len(s["subjects"]) for s in plan["shards"]) - sum(len(s["subjects"]) for s in train),
             len(plan["shards"]), world, plan["fov_mm"], plan["fov_mm"] / cfg.size)

    mine = shards_of_rank(plan["shards"], rank, world)  # each rank writes whole shards
    records, written, kept, error = [], [], [], None
    start, slices_done = time.perf_counter(), [0]
    desc = "preprocess" if world == 1 else f"preprocess (rank 0's share of {world})"
    with progress_bar(sum(len(s["subjects"]) for s in mine), desc, "subjects", enabled=rank == 0) as bar:
        def progress(n_slices):
            slices_done[0] += n_slices
            bar.update(1)
            bar.set_postfix_str(f"{slices_done[0] / max(time.perf_counter() - start, 1e-9):.0f} slices/s")

        for shard in mine:
            try:
                record = shard_is_finished(cfg.output, shard, plan["fingerprint"])
                if record is not None:
                    kept.append(shard["name"])
                    bar.update(len(shard["subjects"]))
                else:
                    record = write_shard(cfg, plan, shard, progress)
                    written.append(shard["name"])
                records.append(record)
            except HpcganError as exc:
                error = ("usage" if isinstance(exc, UsageError) else "runtime", str(exc))
                break

    # Per-rank load (benchmarks/preprocess.py reads this line): CPU seconds since the process started.
    log.debug("rank %d: wrote %d shard(s), %d slices in %.2f s; process CPU %.2f s", rank, len(written),
              slices_done[0], time.perf_counter() - start, time.process_time())
    if comm is not None:
        idle_barrier(comm)  # a rank that finished its shards sleeps until the others have too
    errors = comm.allgather(error) if comm is not None else [error]
    failed = next((e for e in errors if e), None)
    if failed:
        # Leave nothing from this run behind: a failed run writes no shard and no manifest.
        for name in written:
            for path in (os.path.join(cfg.output, name), os.path.join(cfg.output, PARTS_DIR, name + ".json")):
                if os.path.exists(path):
                    os.remove(path)
        if comm is not None:
            comm.Barrier()
        _raise_everywhere(rank, failed)

    gathered = comm.gather((records, kept), root=0) if comm is not None else [(records, kept)]
    if rank == 0:
        by_name = {r["name"]: r for part, _ in gathered for r in part}
        kept = sorted(name for _, part in gathered for name in part)  # every rank's, not only rank 0's
        if kept:
            log.info("kept %d shard(s) finished by an earlier run (checksums match): %s", len(kept), ", ".join(kept))
        manifest = build_manifest(cfg, plan, [by_name[s["name"]] for s in plan["shards"]])
        write_json_atomic(os.path.join(cfg.output, "manifest.json"), manifest)
        elapsed = time.perf_counter() - start
        total = manifest["splits"]["train"]["slices"] + manifest["splits"]["val"]["slices"]
        log.info("wrote %d slices (%d train, %d val) of %d subjects in %.1f s; %d skipped; manifest.json last",
                 total, manifest["splits"]["train"]["slices"], manifest["splits"]["val"]["slices"],
                 len(manifest["subjects"]), elapsed, len(manifest["skipped"]))
    if comm is not None:
        comm.Barrier()
    return 0
