"""The plan of a run, made by rank 0 before any volume is read in full: which subjects are usable
(headers checked), their train/val/test split, which subjects go into which shard, the field of view,
and the fingerprint that says whether an earlier run's shards may be kept. Also prepares the
output directory (refuse another config's dataset, --overwrite, leftovers of a killed run)."""

import hashlib
import os
import secrets
import shutil

import numpy as np

from hpcgan.config import to_dict
from hpcgan.errors import UsageError
from hpcgan.io import atomic_path, check_writable_dir, read_json, write_json_atomic
from hpcgan.log import get_logger
from hpcgan.preprocess import transforms as T
from hpcgan.preprocess.config import PreprocessConfig
from hpcgan.preprocess.manifest import DATASET_FORMAT_VERSION, MANIFEST, NOT_IN_MANIFEST
from hpcgan.preprocess.nifti import (
    BadInput,
    check_same_grid,
    group_by_subject,
    list_input_files,
    read_header,
)
from hpcgan.preprocess.shards import (
    PARTS_DIR,
    SHARD_PATTERN,
    SUBJECT_ID_BYTES,
    shard_name,
)
from hpcgan.preprocess.subject import file_label

NOT_IN_FINGERPRINT = NOT_IN_MANIFEST + ("skip_bad",)
# Options added after datasets were first made, whose default makes the dataset those made: they count in
# the fingerprint only when set, so such a dataset keeps its fingerprint and a re-run still resumes it.
LATER_OPTIONS = {"test_fraction": 0.0, "nan_as_background": False}


def fingerprint(cfg: PreprocessConfig, subjects: dict, salt: str) -> str:
    """Identity of a dataset: config (without paths) and the input files' names, sizes and
    modification times. A re-run with the same fingerprint may resume."""
    config = {
        k: v
        for k, v in to_dict(cfg).items()
        if k not in NOT_IN_FINGERPRINT and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])
    }
    files = []
    for subject in subjects.values():
        for modality, path in sorted(subject.files.items()):
            st = os.stat(path)
            files.append([subject.name, modality, os.path.basename(path), st.st_size, st.st_mtime_ns])
    text = repr((DATASET_FORMAT_VERSION, sorted(config.items()), files, hashlib.sha256(salt.encode()).hexdigest()))
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


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(validation, test) subjects of `n`. A fraction above 0 holds out at least one subject, and at least
    one subject is left for training; UsageError when `n` is too few for a non-empty test split."""
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    if test_fraction > 0:
        need = 2 + (val_fraction > 0)
        if n < need:
            raise UsageError(
                f"--test-fraction {test_fraction}: {n} usable subject(s) are too few for a test split "
                f"(need at least {need}: one each for training{', validation' if val_fraction > 0 else ''} and test)"
            )
        n_test = max(n_test, 1)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1 - n_test)
    return n_val, min(n_test, max(n - 1 - n_val, 0))


def split_subjects(ids: list, val_fraction: float, seed: int, test_fraction: float = 0.0) -> dict:
    """{id: 'train'|'val'|'test'} in the seed's shuffled order (the order shards are filled in, so
    that patterns in subject names do not pile similar subjects into one shard or rank), split
    by subject and reproducible from the seed. Validation takes the first subjects of that order and
    test the next ones: adding a test split takes its subjects from training and leaves the validation
    subjects as they were (unless too few subjects leave room for both)."""
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_val, n_test = split_counts(len(ids), val_fraction, test_fraction)
    return {sid: ("val" if i < n_val else "test" if i < n_val + n_test else "train") for i, sid in enumerate(order)}


def assign_shards(split_ids: list, n_shards: int, split: str) -> list:
    """Subjects → shards round-robin in a fixed order: independent of the number of ranks."""
    count = min(n_shards, len(split_ids))
    return [
        {"name": shard_name(split, j, count), "split": split, "subjects": split_ids[j::count]} for j in range(count)
    ]


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
    """Check every subject's headers (a bad one stops the run, or with --skip-bad goes to
    `skipped`), split and shard the good ones, and prepare the output directory."""
    log = get_logger("preprocess")
    out = check_writable_dir(cfg.output)
    wanted = list(cfg.modalities) + ([cfg.mask] if cfg.mask else [])
    subjects = group_by_subject(list_input_files(cfg.input), wanted)
    if not subjects:
        raise UsageError(
            f"--input: no NIfTI volumes named <subject>_<modality>.nii[.gz] for modalities {', '.join(wanted)}"
        )
    salt = read_salt(cfg.salt_file) if cfg.pseudonymize else ""
    skipped, good, grids, byte_labels = [], {}, {}, True
    for name, subject in subjects.items():
        sid = pseudonym(name, salt) if cfg.pseudonymize else name
        try:
            if len(sid.encode()) > SUBJECT_ID_BYTES:
                raise BadInput(sid, f"subject id longer than {SUBJECT_ID_BYTES} bytes")
            missing = [m for m in wanted if m not in subject.files]
            if missing:
                raise BadInput(
                    sid, f"missing modality {', '.join(missing)} (found: {', '.join(sorted(subject.files))})"
                )
            if subject.duplicates:
                m, others = min(subject.duplicates.items())
                paths = [subject.files[m], *others]
                raise BadInput(
                    sid,
                    f"{len(paths)} files for modality {m}"
                    + ("" if cfg.pseudonymize else f" ({', '.join(map(os.path.basename, paths))})"),
                )
            headers = {
                m: read_header(sid, subject.files[m], file_label(cfg, m, subject.files[m]), cfg.volume_index)
                for m in wanted
            }
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
    splits = split_subjects(sorted(good), cfg.val_fraction, cfg.seed, cfg.test_fraction)
    shards = []
    for split, n_shards in (
        ("train", cfg.shards),
        ("val", max(1, int(round(cfg.shards * cfg.val_fraction)))),
        ("test", max(1, int(round(cfg.shards * cfg.test_fraction)))),
    ):
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
        if SHARD_PATTERN.match(stem) or name in (MANIFEST, PARTS_DIR) or name.startswith(f".{MANIFEST}."):
            names.append(name)
    return names


def prepare_output(cfg: PreprocessConfig, out: str, fp: str):
    """Refuse to mix configs; clear for --overwrite; drop temporaries of an interrupted run;
    record the fingerprint that finished shards will be checked against."""
    ours = dataset_files(out)
    plan_path = os.path.join(out, PARTS_DIR, "plan.json")
    if ours:
        try:
            old = read_json(plan_path, "preprocess plan", required=False)
        except UsageError:  # damaged: as if made with another config (--overwrite replaces it)
            old = None
        old = old.get("fingerprint") if isinstance(old, dict) else None
        if old != fp and not cfg.overwrite:
            raise UsageError(
                f"{out}: holds a dataset made with a different config or input; pass --overwrite to replace it"
            )
        for name in ours:
            path = os.path.join(out, name)
            if cfg.overwrite or (name.startswith(".") and name != PARTS_DIR):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(os.path.join(out, PARTS_DIR), exist_ok=True)
    write_json_atomic(plan_path, {"fingerprint": fp})
