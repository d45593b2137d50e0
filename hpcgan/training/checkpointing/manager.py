"""A training run's checkpoints, through one object: saved by rank 0 in the background (what a checkpoint
holds beside the TrainState: versions, config, dataset shapes, the --init-from record), found again and
loaded for --resume, --init-from and train.nonfinite=rollback, each time on rank 0 and received by every
rank through `Group.on_root`, so that a bad file ends every rank with the same line and none waits."""

import time
from pathlib import Path

from hpcgan import __version__
from hpcgan.config import to_dict
from hpcgan.errors import UsageError
from hpcgan.io import sha256_file
from hpcgan.log import get_logger
from hpcgan.metrics import METRICS
from hpcgan.training.checkpointing.files import CHECKPOINTS_DIR, find_latest_valid, load_checkpoint
from hpcgan.training.checkpointing.writer import CheckpointWriter
from hpcgan.training.config import MODEL_SECTIONS, saved_section
from hpcgan.training.run_directory import METRICS_FILE

log = get_logger("checkpoint")

# What sampling needs to know about the data: shapes and physical units, never paths or subjects.
DATASET_KEYS = (
    "image_shape",
    "pixel_spacing_mm",
    "slice_thickness_mm",
    "intensity",
    "modalities",
    "dtype",
    "mask_classes",
    "class_names",
)


def dataset_info(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in DATASET_KEYS}


class Checkpointer:
    """RUN_DIR/checkpoints of one run. Every rank makes one (the loads are collectives); rank 0 alone writes.
    `init_from`: the record of the checkpoint a fine-tuning run started from (its sha256, step, ...), set by
    `load_init` and kept in every checkpoint of the run."""

    def __init__(self, cfg, group, run_dir, manifest: dict):
        self.cfg, self.group = cfg, group
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / CHECKPOINTS_DIR
        self.dataset = dataset_info(manifest)
        self.init_from = None
        self.writer = self._writer() if group.is_root else None
        self.last_save_time = time.monotonic()

    def _writer(self) -> CheckpointWriter:
        ck, evaluated = self.cfg.checkpoint, bool(self.cfg.eval.every_steps)
        higher_is_better = evaluated and METRICS[ck.best_metric].higher_is_better
        return CheckpointWriter(
            self.directory,
            keep_last=ck.keep,
            best_metric=ck.best_metric if evaluated else None,
            best_mode="max" if higher_is_better else "min",
            max_memorization=ck.max_memorization if evaluated else None,
            describes=(self.run_dir / METRICS_FILE,),
        )

    # --- saving ---------------------------------------------------------------------------------------
    def due_by_time(self) -> bool:
        """checkpoint.every_minutes has passed on rank 0's clock (False elsewhere: the loop's agreement takes the
        max over ranks, so rank 0 decides for all)."""
        minutes = self.cfg.checkpoint.every_minutes
        return bool(self.writer and minutes) and time.monotonic() - self.last_save_time >= 60 * minutes

    def raise_if_failed(self):
        """A failed background write stops the job now (rank 0 raises; cli ends every rank)."""
        if self.writer:
            self.writer.raise_if_failed()

    def save(self, training: dict | None, step: int, eval_values: dict | None):
        """`training`: TrainState.state_dict() (None off rank 0). Copied to host memory now, written in the
        background."""
        if self.writer is None:
            return
        checkpoint = {
            "hpcgan_version": __version__,
            "config": to_dict(self.cfg),
            "dataset": self.dataset,
            **training,
            **({"init_from": self.init_from} if self.init_from else {}),
        }
        self.writer.submit(checkpoint, step, metrics=eval_values)
        self.last_save_time = time.monotonic()

    def close(self):
        """Waits for the last write: it is on disk before the job ends."""
        if self.writer:
            self.writer.close()

    def has_best(self) -> bool:
        return (self.directory / "best").exists()

    # --- loading: rank 0 reads, every rank receives ------------------------------------------------------
    def load_resume(self, resume: str | None) -> dict | None:
        """--resume: "auto" (the newest valid checkpoint of the run, None when there is none yet) or a
        checkpoint file checked by `check_resume`. Refuses a checkpoint whose model or loss differs from the
        config; other sections (steps, intervals, learning rates) may change."""
        return None if resume is None else self.group.on_root(self._read_resume, resume)

    def _read_resume(self, resume):
        path = find_latest_valid(self.directory) if resume == "auto" else resume
        if path is None:
            log.info("--resume auto: no checkpoint in %s yet, starting fresh", self.directory.parent)
            return None
        state = load_checkpoint(path)
        current = to_dict(self.cfg)
        for section in MODEL_SECTIONS:
            old, new = saved_section(state["config"], section), current[section]
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                raise UsageError(
                    f"{Path(path).name}: the checkpoint was trained with a different {section} "
                    f"({section}.{changed[0]}: {old.get(changed[0])!r} there, {new.get(changed[0])!r} now); "
                    "resume with the same model and loss, or start a new run"
                )
        log.info("resuming from %s (step %d)", Path(path).name, state["step"])
        return state

    def load_init(self, path, with_optimizer: bool, resumed: dict | None) -> dict | None:
        """--init-from (checked by `check_init_from`): the networks of another run's checkpoint (with its Adam
        moments if `with_optimizer`), on every rank; sets `init_from`. `resumed`: the run's own checkpoint
        (--resume auto found one), which continues as it is if it was fine-tuned from the same file: returns
        None then. Without --init-from: None, and `init_from` is the resumed run's record if it has one."""
        if path is None:
            self.init_from = (resumed or {}).get("init_from")
            return None
        init, self.init_from = self.group.on_root(self._read_init, path, with_optimizer, resumed)
        return init

    def _read_init(self, path, with_optimizer, resumed):
        sha = sha256_file(path)
        if resumed is not None:
            record = resumed.get("init_from")
            if (record or {}).get("sha256") != sha:
                raise UsageError(
                    f"--init-from {path}: the run in --out was not fine-tuned from this checkpoint; "
                    "use a new --out, or continue the run without --init-from"
                )
            return None, record
        source = load_checkpoint(path)
        keys = ("G", "D", "G_ema", *(("opt_G", "opt_D") if with_optimizer else ()))
        record = {"sha256": sha, "step": source.get("step"), "optimizer": with_optimizer}
        log.info("initialising from a checkpoint of step %s (sha256 %s)", record["step"], sha[:12])
        return {k: source.get(k) for k in keys}, record

    def load_rollback(self, failed_step: int, count: int) -> dict | None:
        """train.nonfinite=rollback: the newest valid checkpoint up to `failed_step` (after the write in
        flight has landed) on every rank, or None if there is none."""
        return self.group.on_root(self._read_rollback, failed_step, count)

    def _read_rollback(self, failed_step, count):
        self.writer.flush()
        path = find_latest_valid(self.directory, max_step=failed_step)
        if path is None:
            return None
        state = load_checkpoint(path)
        log.warning(
            "rollback %d: back to %s (step %d) after step %d; continuing with the next batches and new latents",
            count,
            path.name,
            state["step"],
            failed_step,
        )
        return state
