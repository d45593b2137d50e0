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

import os
import time

from hpcgan.errors import HpcganError, UsageError
from hpcgan.io import write_json_atomic
from hpcgan.log import get_logger
from hpcgan.preprocess.config import add_arguments, load_preprocess_config
from hpcgan.preprocess.manifest import build_manifest, mask_classes
from hpcgan.preprocess import transforms as T
from hpcgan.preprocess.plan import make_plan, shards_of_rank
from hpcgan.preprocess.shards import record_path, shard_is_finished, write_shard
from hpcgan.progress import progress_bar

__all__ = ["add_arguments", "run"]  # what hpcgan.cli calls; the flags come from PreprocessConfig


def _raise_everywhere(rank: int, error):
    """Raise the same failure on every rank; only rank 0 prints it (others exit quietly)."""
    kind, message = error
    if rank != 0:
        raise SystemExit(2 if kind == "usage" else 1)
    raise (UsageError if kind == "usage" else HpcganError)(message)


def check_label_set(cfg, records: list):
    """("usage", message) when the masks do not fit the label set, else None: a --label-map source label
    that no subject's mask holds (a typo, or the wrong dataset), more labels than a one-hot mask can
    take, or --class-names that do not name every class."""
    if not cfg.mask:
        return None
    seen = {label for r in records for s in r["subjects"].values() for label in s.get("mask_labels", [])}
    if cfg.label_map:
        named = sorted(k for k in T.parse_label_map(cfg.label_map) if k not in (0, T.OTHER_LABELS))
        absent = [k for k in named if k not in seen]
        if absent:
            return "usage", (
                f"--label-map {cfg.label_map}: label {absent[0]} is in no subject's mask "
                f"(labels present: {', '.join(map(str, sorted(seen)[:20])) or 'none'})"
            )
    classes = mask_classes(cfg, seen)
    if cfg.class_names and len(cfg.class_names) != classes:
        return "usage", f"--class-names: {len(cfg.class_names)} names for {classes} classes (0..{classes - 1})"
    return None


def run(args):
    from hpcgan.parallel.group import world_group

    cfg = load_preprocess_config(args)
    log = get_logger("preprocess")
    group = world_group()
    rank, world = group.rank, group.world_size

    plan, error = None, None
    if rank == 0:
        try:
            plan = make_plan(cfg)
        except HpcganError as exc:
            error = ("usage" if isinstance(exc, UsageError) else "runtime", str(exc))
    group.barrier()  # the other ranks sleep while rank 0 plans
    plan, error = group.broadcast_object((plan, error), root=0)
    if error:
        _raise_everywhere(rank, error)
    train = [s for s in plan["shards"] if s["split"] == "train"]
    log.info(
        "%d subjects (%d train, %d val) in %d shards on %d rank(s); field of view %.1f mm -> %.3f mm pixels",
        len(plan["subjects"]),
        sum(len(s["subjects"]) for s in train),
        sum(len(s["subjects"]) for s in plan["shards"]) - sum(len(s["subjects"]) for s in train),
        len(plan["shards"]),
        world,
        plan["fov_mm"],
        plan["fov_mm"] / cfg.size,
    )

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
    log.debug(
        "rank %d: wrote %d shard(s), %d slices in %.2f s; process CPU %.2f s",
        rank,
        len(written),
        slices_done[0],
        time.perf_counter() - start,
        time.process_time(),
    )
    group.barrier()  # a rank that finished its shards sleeps until the others have too
    gathered = group.gather_object((error, records, kept))
    failed = next((e for e, _, _ in gathered if e), None)
    if not failed:
        failed = check_label_set(cfg, [r for _, part, _ in gathered for r in part])
    if failed:
        # Leave nothing from this run behind: a failed run writes no shard and no manifest.
        for name in written:
            for path in (os.path.join(cfg.output, name), record_path(cfg.output, name)):
                if os.path.exists(path):
                    os.remove(path)
        group.barrier()
        _raise_everywhere(rank, failed)

    if rank == 0:
        by_name = {r["name"]: r for _, part, _ in gathered for r in part}
        kept = sorted(name for _, _, part in gathered for name in part)  # every rank's, not only rank 0's
        if kept:
            log.info("kept %d shard(s) finished by an earlier run (checksums match): %s", len(kept), ", ".join(kept))
        manifest = build_manifest(cfg, plan, [by_name[s["name"]] for s in plan["shards"]])
        write_json_atomic(os.path.join(cfg.output, "manifest.json"), manifest)
        elapsed = time.perf_counter() - start
        total = manifest["splits"]["train"]["slices"] + manifest["splits"]["val"]["slices"]
        log.info(
            "wrote %d slices (%d train, %d val) of %d subjects in %.1f s; %d skipped; manifest.json last",
            total,
            manifest["splits"]["train"]["slices"],
            manifest["splits"]["val"]["slices"],
            len(manifest["subjects"]),
            elapsed,
            len(manifest["skipped"]),
        )
    group.barrier()
    return 0
