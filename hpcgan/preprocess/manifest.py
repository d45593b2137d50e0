"""The dataset's manifest.json, written by rank 0 after every shard: what the dataset holds
(shape, splits, shards with checksums, subjects with their slices and source files, skipped
subjects) and how it was made; `load_manifest` reads it back (training, evaluation, `hpcgan info`),
without torch."""

import json
import os

import numpy as np

from hpcgan import __version__
from hpcgan.config import to_dict
from hpcgan.errors import UsageError
from hpcgan.preprocess import transforms as T

MANIFEST = "manifest.json"
DATASET_FORMAT = "hpcgan-dataset"  # "format" of the manifest and of every shard's attributes
DATASET_FORMAT_VERSION = 1
# Keys that name places on disk or how to treat an existing output: never part of the
# dataset's identity, and paths never reach the manifest.
NOT_IN_MANIFEST = ("input", "output", "salt_file", "overwrite")


def mask_classes(cfg, seen_labels) -> int:
    """K, the number of classes 0..K-1 of the stored masks: the label map's, else the largest label + 1."""
    if cfg.label_map:
        return max(T.parse_label_map(cfg.label_map).values()) + 1
    return max(seen_labels, default=0) + 1


def load_manifest(dataset_dir) -> dict:
    """The dataset's manifest.json; UsageError naming the directory if it is not a dataset."""
    path = os.path.join(os.fspath(dataset_dir), MANIFEST)
    if not os.path.isdir(dataset_dir):
        raise UsageError(f"{dataset_dir}: no such dataset directory")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{dataset_dir}: not a dataset (no {MANIFEST}; run hpcgan preprocess)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise UsageError(f"{path}: not an hpcgan dataset manifest (format is not {DATASET_FORMAT!r})")
    if manifest.get("format_version") != DATASET_FORMAT_VERSION:
        raise UsageError(
            f"{path}: format_version {manifest.get('format_version')} is not supported (need {DATASET_FORMAT_VERSION})"
        )
    return manifest


def label_set_problem(cfg, records: list) -> str | None:
    """Why the masks of every shard's `records` do not fit the label set, else None: a --label-map source
    label that no subject's mask holds (a typo, or the wrong dataset), or --class-names that do not name
    every class."""
    if not cfg.mask:
        return None
    seen = {label for r in records for s in r["subjects"].values() for label in s.get("mask_labels", [])}
    if cfg.label_map:
        named = sorted(k for k in T.parse_label_map(cfg.label_map) if k not in (0, T.OTHER_LABELS))
        absent = [k for k in named if k not in seen]
        if absent:
            return (
                f"--label-map {cfg.label_map}: label {absent[0]} is in no subject's mask "
                f"(labels present: {', '.join(map(str, sorted(seen)[:20])) or 'none'})"
            )
    classes = mask_classes(cfg, seen)
    if cfg.class_names and len(cfg.class_names) != classes:
        return f"--class-names: {len(cfg.class_names)} names for {classes} classes (0..{classes - 1})"
    return None


def mask_label_set(cfg, subjects: dict) -> dict:
    """The manifest's label set: `mask_classes` K (stored masks hold 0..K-1), `class_names`, the
    `label_map` that made them (None: the source labels as they are) and the source labels present."""
    seen = sorted({label for s in subjects.values() for label in s.get("mask_labels", [])})
    classes = mask_classes(cfg, seen)
    names = list(cfg.class_names) or ["background"] + [f"class {k}" for k in range(1, classes)]
    return {"mask_classes": classes, "class_names": names, "label_map": cfg.label_map, "mask_labels": seen}


def build_manifest(cfg, plan: dict, records: list) -> dict:
    """The manifest of a finished run: `cfg` (a PreprocessConfig), the plan (hpcgan.preprocess.plan)
    and every shard's record (hpcgan.preprocess.shards.write_shard), in the plan's shard order."""
    subjects, skipped = {}, list(plan["skipped"])
    order = {shard["name"]: shard["subjects"] for shard in plan["shards"]}
    for record in records:
        subjects.update(record["subjects"])
        skipped += record["skipped"]
    splits = {}
    for split in ("train", "val") + (("test",) if cfg.test_fraction > 0 else ()):  # no test key: as before
        mine = [r for r in records if r["split"] == split]
        splits[split] = {
            "slices": sum(r["slices"] for r in mine),
            "shards": [r["name"] for r in mine],
            "subjects": sum(len(r["subjects"]) for r in mine),
        }
    per_modality = {}
    for modality in cfg.modalities:
        los = [s["intensity"][modality][0] for s in subjects.values()]
        his = [s["intensity"][modality][1] for s in subjects.values()]
        per_modality[modality] = {"lo": float(np.median(los)), "hi": float(np.median(his))} if los else None
    first = per_modality[cfg.modalities[0]] or {"lo": 0.0, "hi": 0.0}
    return {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "hpcgan_version": __version__,
        "fingerprint": plan["fingerprint"],
        "config": {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_MANIFEST},
        "image_shape": [cfg.num_channels, cfg.size, cfg.size],
        "dtype": cfg.dtype,
        "modalities": list(cfg.modalities),
        "mask": cfg.mask,
        "has_masks": bool(cfg.mask),
        **(mask_label_set(cfg, subjects) if cfg.mask else {}),
        "fov_mm": plan["fov_mm"],
        "pixel_spacing_mm": [plan["fov_mm"] / cfg.size] * 2,
        "slice_thickness_mm": plan["slice_thickness_mm"],
        "intensity": {"norm": cfg.norm, "lo": first["lo"], "hi": first["hi"], "per_modality": per_modality},
        "splits": splits,
        # Subjects in the order the shard holds them: a record read back from disk (a kept shard)
        # has its keys sorted, so the order comes from the plan, the same for a fresh and a resumed run.
        "shards": [
            {k: r[k] for k in ("name", "split", "slices", "sha256")}
            | {"subjects": [sid for sid in order[r["name"]] if sid in r["subjects"]]}
            for r in records
        ],
        "subjects": dict(sorted(subjects.items())),
        "skipped": skipped,
    }
