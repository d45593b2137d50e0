"""HDF5 shards: `images` (N, C, H, W) chunked along N, `subject`, `slice_index`, optional
`masks` (N, H, W), attributes with the normalisation parameters. A shard is written under a
temporary name and renamed when complete (hpcgan.io.atomic_path); then its record (subjects,
slices, checksum) goes to .parts/, where a re-run finds the shards it may keep."""

import json
import os
import re

import numpy as np

from hpcgan.errors import UsageError
from hpcgan.io import HDF5Output, atomic_path, read_json, sha256_file, write_json_atomic
from hpcgan.log import get_logger
from hpcgan.preprocess.config import PreprocessConfig
from hpcgan.preprocess.manifest import DATASET_FORMAT, DATASET_FORMAT_VERSION
from hpcgan.preprocess.nifti import BadInput
from hpcgan.preprocess.subject import process_subject, source_files

SHARD_PATTERN = re.compile(r"^(train|val|test)-(\d{5})-of-(\d{5})\.h5$")
SUBJECT_ID_BYTES = 64
PARTS_DIR = ".parts"  # per-shard records (resume) and the plan fingerprint


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def record_path(out: str, name: str) -> str:
    """Where the record of shard `name` is kept."""
    return os.path.join(out, PARTS_DIR, name + ".json")


class ShardWriter:
    """Append whole subjects to an open HDF5 file. Datasets grow along N; the byte layout
    depends only on what is appended, in which order, so any rank writes the same file."""

    def __init__(
        self,
        path,
        channels: int,
        size: int,
        dtype: str,
        mask_dtype: str | None,
        compression: str,
        chunk_slices: int,
        attrs: dict,
    ):
        self.output = HDF5Output(path, track_order=False)  # a full disk fails cleanly (see HDF5Output)
        self.file = self.output.file
        options = {"compression": None if compression == "none" else compression, "track_times": False}
        if compression == "gzip":
            options["compression_opts"] = 4
        self.images = self.file.create_dataset(
            "images",
            shape=(0, channels, size, size),
            maxshape=(None, channels, size, size),
            dtype=dtype,
            chunks=(chunk_slices, channels, size, size),
            **options,
        )
        self.masks = None
        if mask_dtype:
            self.masks = self.file.create_dataset(
                "masks",
                shape=(0, size, size),
                maxshape=(None, size, size),
                dtype=mask_dtype,
                chunks=(chunk_slices, size, size),
                **options,
            )
        self.subject = self.file.create_dataset(
            "subject", shape=(0,), maxshape=(None,), dtype=f"S{SUBJECT_ID_BYTES}", chunks=(1024,), track_times=False
        )
        self.slice_index = self.file.create_dataset(
            "slice_index", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1024,), track_times=False
        )
        for key, value in attrs.items():
            self.file.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        self.count = 0

    def append(self, subject_id: str, slice_indices, images: np.ndarray, masks=None):
        n = len(slice_indices)
        if n == 0:
            return
        start, stop = self.count, self.count + n
        for dataset in (self.images, self.subject, self.slice_index) + ((self.masks,) if self.masks else ()):
            dataset.resize(stop, axis=0)
        self.images[start:stop] = images
        if self.masks is not None:
            self.masks[start:stop] = masks
        self.subject[start:stop] = np.full(n, subject_id.encode(), dtype=f"S{SUBJECT_ID_BYTES}")
        self.slice_index[start:stop] = np.asarray(slice_indices, dtype=np.int32)
        self.count = stop
        self.output.check()

    def close(self, attrs: dict | None = None):
        for key, value in (attrs or {}).items():
            self.file.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        self.output.close()


def shard_is_finished(out: str, shard: dict, fp: str):
    """The record of a shard finished by an earlier run with the same fingerprint whose file
    still has the recorded checksum; else None."""
    path = os.path.join(out, shard["name"])
    if not os.path.exists(path):
        return None
    try:
        record = read_json(record_path(out, shard["name"]), "shard record", required=False)
    except UsageError:  # a damaged record: the shard is written again
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fp or record.get("sha256") != sha256_file(path):
        return None
    return record


def write_shard(cfg: PreprocessConfig, plan: dict, shard: dict, progress) -> dict:
    """Process the shard's subjects in the plan's order and write them to one HDF5 file, then its
    record. `progress(n_slices)` is called once per subject. Returns the record."""
    out = cfg.output
    log = get_logger("preprocess")
    attrs = {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "split": shard["split"],
        "modalities": list(cfg.modalities),
        "norm": cfg.norm,
        "norm_params": {
            "percentiles": cfg.percentiles,
            "zscore_clip": cfg.zscore_clip,
            "ct_level": cfg.ct_level,
            "ct_width": cfg.ct_width,
        },
        "pixel_spacing_mm": [plan["fov_mm"] / cfg.size] * 2,
    }
    subjects, skipped = {}, []
    path = os.path.join(out, shard["name"])
    with atomic_path(path) as tmp:
        writer = ShardWriter(
            tmp,
            cfg.num_channels,
            cfg.size,
            cfg.dtype,
            plan["mask_dtype"] if cfg.mask else None,
            cfg.compression,
            cfg.chunk_slices,
            attrs,
        )
        try:
            for sid in shard["subjects"]:
                files = plan["subjects"][sid]["files"]
                try:
                    indices, images, masks, info = process_subject(cfg, sid, files, plan["fov_mm"], plan["mask_dtype"])
                except BadInput as exc:
                    if not cfg.skip_bad:
                        raise
                    log.warning("skipping %s", exc)
                    skipped.append({"subject": sid, "reason": exc.reason})
                    progress(0)
                    continue
                writer.append(sid, indices, images, masks)
                subjects[sid] = {
                    "split": shard["split"],
                    "shard": shard["name"],
                    "slices": len(indices),
                    "slice_indices": [int(i) for i in indices],
                    "intensity": info["intensity"],
                    "files": source_files(cfg, sid, files, info["digests"]),
                }
                if "mask_labels" in info:
                    subjects[sid]["mask_labels"] = info["mask_labels"]
                progress(len(indices))
        finally:
            writer.close({"intensity": {sid: s["intensity"] for sid, s in subjects.items()}})
    record = {
        "fingerprint": plan["fingerprint"],
        "name": shard["name"],
        "split": shard["split"],
        "slices": sum(s["slices"] for s in subjects.values()),
        "sha256": sha256_file(path),
        "subjects": subjects,
        "skipped": skipped,
    }
    write_json_atomic(record_path(out, shard["name"]), record)
    return record
