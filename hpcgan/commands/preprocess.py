"""Turn a cohort of NIfTI volumes into a sharded HDF5 training dataset.

Input files are named <subject>_<modality>.nii[.gz], one folder per subject (BraTS layout) or
all in one folder, or chosen by a glob (quote it). Each volume is reoriented to RAS, its axial
slices are selected, normalised to [-1, 1] (background -1), padded to a square field of view in
millimetres and resized with anti-aliasing. Subjects are split by subject into train/val, and with
--test-fraction a test split that training and its evaluation never read (hpcgan evaluate --split test).

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
from dataclasses import dataclass, field

from hpcgan.errors import HpcganError, UsageError
from hpcgan.io import write_json_atomic
from hpcgan.log import get_logger
from hpcgan.parallel.group import Group, fail_together, world_group
from hpcgan.preprocess.config import add_arguments, load_preprocess_config
from hpcgan.preprocess.manifest import MANIFEST, build_manifest, label_set_problem
from hpcgan.preprocess.plan import make_plan, shards_of_rank
from hpcgan.preprocess.shards import record_path, shard_is_finished, write_shard
from hpcgan.progress import progress_bar

__all__ = ["add_arguments", "run"]  # what hpcgan.cli calls; the flags come from PreprocessConfig

log = get_logger("preprocess")


@dataclass
class RankShare:
    """What one rank did with its shards: the records of those now finished, and how it ended."""

    records: list = field(default_factory=list)  # written by this run or kept, in the order done
    written: list = field(default_factory=list)  # names of the shards this run wrote
    kept: list = field(default_factory=list)  # names of the shards an earlier run finished
    slices: int = 0
    failure: tuple | None = None  # (exit code, message) of the error that stopped this rank


def run(args):
    cfg = load_preprocess_config(args)
    group = world_group()
    plan = group.on_root(make_plan, cfg)  # every rank gets rank 0's plan or ends with its error
    log_plan(cfg, plan, group.world_size)
    start = time.perf_counter()
    share = write_shards(cfg, plan, shards_of_rank(plan["shards"], group.rank, group.world_size), group)
    records, kept = gather_shares(cfg, share, group)
    if group.is_root:
        write_manifest(cfg, plan, records, kept, start)
    group.barrier()
    return 0


def log_plan(cfg, plan: dict, world_size: int):
    per_split = {split: 0 for split in ("train", "val", "test")}
    for shard in plan["shards"]:
        per_split[shard["split"]] += len(shard["subjects"])
    log.info(
        "%d subjects (%s) in %d shards on %d rank(s); field of view %.1f mm -> %.3f mm pixels",
        len(plan["subjects"]),
        ", ".join(f"{n} {split}" for split, n in per_split.items() if split != "test" or cfg.test_fraction > 0),
        len(plan["shards"]),
        world_size,
        plan["fov_mm"],
        plan["fov_mm"] / cfg.size,
    )


def write_shards(cfg, plan: dict, shards: list, group: Group) -> RankShare:
    """Write this rank's `shards` (whole shards: their bytes do not depend on the rank), keeping those an
    earlier run finished; the first error stops the rank and is kept in the share for every rank to see."""
    share, start = RankShare(), time.perf_counter()
    world = group.world_size
    desc = "preprocess" if world == 1 else f"preprocess (rank 0's share of {world})"
    with progress_bar(sum(len(s["subjects"]) for s in shards), desc, "subjects", enabled=group.is_root) as bar:

        def progress(n_slices):
            share.slices += n_slices
            bar.update(1)
            bar.set_postfix_str(f"{share.slices / max(time.perf_counter() - start, 1e-9):.0f} slices/s")

        for shard in shards:
            try:
                record = shard_is_finished(cfg.output, shard, plan["fingerprint"])
                if record is not None:
                    share.kept.append(shard["name"])
                    bar.update(len(shard["subjects"]))
                else:
                    record = write_shard(cfg, plan, shard, progress)
                    share.written.append(shard["name"])
                share.records.append(record)
            except HpcganError as exc:
                share.failure = (exc.exit_code, str(exc))
                break
    # Per-rank load (benchmarks/preprocess.py reads this line): CPU seconds since the process started.
    log.debug(
        "rank %d: wrote %d shard(s), %d slices in %.2f s; process CPU %.2f s",
        group.rank,
        len(share.written),
        share.slices,
        time.perf_counter() - start,
        time.process_time(),
    )
    return share


def gather_shares(cfg, share: RankShare, group: Group) -> tuple[list, list]:
    """Collective: every rank's shard records and the names of the kept shards. When a rank failed, or
    the masks do not fit the label set, every rank removes the shards it wrote (a failed run leaves no
    shard and no manifest) and all end with the first failure, printed once by rank 0."""
    group.barrier()  # a rank that finished its shards sleeps until the others have too
    shares = group.gather_object(share)
    records = [r for s in shares for r in s.records]
    failure = next((s.failure for s in shares if s.failure), None)
    if failure is None and (problem := label_set_problem(cfg, records)):
        failure = (UsageError.exit_code, problem)
    if failure:
        for name in share.written:
            for path in (os.path.join(cfg.output, name), record_path(cfg.output, name)):
                if os.path.exists(path):
                    os.remove(path)
        group.barrier()
        fail_together(group.rank, *failure)
    return records, sorted(name for s in shares for name in s.kept)  # every rank's, not only rank 0's


def write_manifest(cfg, plan: dict, records: list, kept: list, start: float):
    """manifest.json last, once every shard is finished: its presence marks a complete dataset."""
    if kept:
        log.info("kept %d shard(s) finished by an earlier run (checksums match): %s", len(kept), ", ".join(kept))
    by_name = {r["name"]: r for r in records}
    manifest = build_manifest(cfg, plan, [by_name[s["name"]] for s in plan["shards"]])
    write_json_atomic(os.path.join(cfg.output, MANIFEST), manifest)
    splits = manifest["splits"]
    log.info(
        "wrote %d slices (%s) of %d subjects in %.1f s; %d skipped; manifest.json last",
        sum(info["slices"] for info in splits.values()),
        ", ".join(f"{info['slices']} {split}" for split, info in splits.items()),
        len(manifest["subjects"]),
        time.perf_counter() - start,
        len(manifest["skipped"]),
    )
