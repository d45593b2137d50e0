"""Rank 0's duties in one place: the run directory, metrics (JSONL + TensorBoard), the progress
bar, sample grids, evaluation during training and checkpoints. Other ranks never touch RUN_DIR.

RUN_DIR/
  config.yaml        the resolved config (no dataset path: it is a command-line argument)
  env.json           versions, backend, world size, devices
  metrics.jsonl      one JSON object per line: training {"step", "epoch", "time_s", "images_per_s",
                     "data_wait", "allreduce_wait" (fractions of wall time), "loss_d", "loss_g", ...};
                     evaluation {"step", "eval": {...}}; fine-tuning {"step": 0, "init_from": {"sha256", ...}}
  samples/grid-00001000.png   the fixed latents rendered by G-EMA every log.sample_every_steps
  checkpoints/       ckpt-00001000.pt, checkpoints.json, latest, best (hpcgan.checkpoint)
  tb/                TensorBoard events (log.tensorboard)"""

import json
import os
import platform
import time
from pathlib import Path

import torch
import yaml

from hpcgan import __version__
from hpcgan.checkpoint import CheckpointWriter
from hpcgan.config import to_dict
from hpcgan.io import read_jsonl, remove_temp_files, write_bytes_atomic, write_json_atomic
from hpcgan.log import get_logger
from hpcgan.metrics import METRICS
from hpcgan.networks import eval_mode, split_joint
from hpcgan.progress import progress_bar
from hpcgan.stacks import contact_sheet, write_png

log = get_logger("coordinator")


class Coordinator:
    def __init__(self, run_dir, cfg, dataset_dir, backend_info: dict, init_from: dict | None = None):
        """`init_from`: the record of the checkpoint a fine-tuning run started from (--init-from: its sha256,
        step, ...), logged at step 0 and kept in every checkpoint of the run."""
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.dataset_dir = dataset_dir
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        for directory in (self.run_dir, self.run_dir / "samples"):
            for name in remove_temp_files(directory):
                log.info("removed %s, left by an interrupted write", name)
        write_bytes_atomic(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
        env = environment(backend_info)
        write_json_atomic(self.run_dir / "env.json", env)
        log.info(
            "environment: hpcgan %s, torch %s, %s backend, world %d, device %s%s",
            env["hpcgan"],
            env["torch"],
            env["backend"],
            env["world_size"],
            env["device"],
            f", GPUs {env['gpus']}" if env.get("gpus") else "",
        )
        ck = cfg.checkpoint
        higher_is_better = METRICS[ck.best_metric].higher_is_better if cfg.eval.every_steps else False
        self.checkpoints = CheckpointWriter(
            self.run_dir / "checkpoints",
            keep_last=ck.keep,
            best_metric=ck.best_metric if cfg.eval.every_steps else None,
            best_mode="max" if higher_is_better else "min",
            max_memorization=ck.max_memorization if cfg.eval.every_steps else None,
        )
        self.init_from = init_from
        self.memorized_in_a_row = 0  # evaluations above checkpoint.max_memorization (train.stop_on_memorization)
        self.tb = None
        self.bar = None
        self.last_checkpoint_time = time.monotonic()
        self.last_log = (time.perf_counter(), 0)
        self.eval_reference = None  # real images for evaluation, read once

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self, step: int, G, grid_latents):
        self.grid_latents = grid_latents
        self.last_log = (time.perf_counter(), step)
        self._trim_metrics(step)
        if self.cfg.checkpoint.max_memorization and step:  # a resumed run continues the count it had
            for record in read_jsonl(self.run_dir / "metrics.jsonl"):
                if isinstance(record.get("eval"), dict):
                    self._count_memorized((record["eval"].get("memorization") or {}).get("value"))
        if self.cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard's event files are append-only logs too: purge_step hides the events a
            # killed run logged after the checkpoint this run resumes from.
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=step + 1 if step else None)
        self.bar = progress_bar(self.cfg.train.steps, "train", "steps", initial=step)
        if step == 0 and self.init_from:
            self._append({"step": 0, "init_from": self.init_from})
        if step == 0 and self.cfg.log.sample_every_steps:
            self.save_grid(0, G)

    def finish(self, step: int, G, preempted: bool = False, nonfinite: bool = False):
        if self.cfg.log.sample_every_steps and step % self.cfg.log.sample_every_steps and not nonfinite:
            self.save_grid(step, G)
        self.checkpoints.close()  # the last write is on disk before the job ends
        guard = self.cfg.checkpoint.max_memorization
        if guard and self.cfg.eval.every_steps and not (self.checkpoints.directory / "best").exists():
            log.warning(
                "no evaluated checkpoint passed the memorisation guard (memorization <= checkpoint.max_memorization "
                "%g): checkpoints/best is not written",
                guard,
            )
        if self.tb:
            self.tb.close()
        if self.bar:
            self.bar.close()
        if preempted:
            log.info("run stopped for preemption at step %d; continue it with --resume auto", step)
        elif not nonfinite:  # after NaN/inf the rank that saw it has said why, in one line
            log.info("run finished at step %d: %s", step, self.run_dir)

    # --- metrics -------------------------------------------------------------------------------------
    def log_train(self, step, epoch, metrics: dict, global_batch: int, waits: dict):
        """`waits`: rank 0's seconds since the last line spent waiting for data and for the allreduce."""
        now = time.perf_counter()
        t0, step0 = self.last_log
        elapsed = max(now - t0, 1e-9)
        self.last_log = (now, step)
        line = {
            "step": step,
            "epoch": epoch,
            "time_s": round(time.time(), 3),
            "images_per_s": round((step - step0) * global_batch / elapsed, 2),
            **{f"{k}_wait": round(v / elapsed, 4) for k, v in waits.items()},
            **{k: round(v, 6) for k, v in metrics.items()},
        }
        self._append(line)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.add_scalar("perf/images_per_s", line["images_per_s"], step)
        if self.bar:
            self.bar.n = step
            self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss_d", "loss_g") if k in metrics}, refresh=False)
            self.bar.refresh()

    def _append(self, line: dict):
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def _trim_metrics(self, step: int):
        """On resume, drop lines logged after the checkpoint (they will be logged again) and a torn
        last line left by a killed job, so that the next line does not glue onto it."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [record for record in read_jsonl(path) if record.get("step", 0) <= step]
        write_bytes_atomic(path, "".join(json.dumps(record) + "\n" for record in kept).encode())

    # --- images ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def save_grid(self, step: int, G):
        z, labels = self.grid_latents
        with eval_mode(G):
            images = G(z, labels).float().cpu().numpy()
        nrow = max(1, int(len(images) ** 0.5))
        path = self.run_dir / "samples" / f"grid-{step:08d}.png"
        images, masks = split_joint(images, self.cfg.model.channels)
        sheet = contact_sheet(images, nrow=nrow, masks=masks)
        write_png(sheet, path)
        if self.tb:
            self.tb.add_image("samples", sheet if sheet.ndim == 3 else sheet[..., None], step, dataformats="HWC")

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, step: int, images):
        from hpcgan.data import read_slices
        from hpcgan.metrics import evaluate

        n = self.cfg.eval.num_images
        if self.eval_reference is None:
            self.eval_reference = (
                read_slices(self.dataset_dir, "train", max_items=n, seed=self.cfg.train.seed),
                read_slices(self.dataset_dir, "val", max_items=n, seed=self.cfg.train.seed),
            )
        train, val = self.eval_reference
        results = evaluate(images, train, val if len(val) else None, metrics=tuple(self.cfg.eval.metrics))
        self._append({"step": step, "eval": results})
        values = {}
        for name, r in results.items():
            if isinstance(r, dict) and isinstance(r.get("value"), (int, float)):
                values[name] = float(r["value"])
                if self.tb:
                    self.tb.add_scalar(f"eval/{name}", r["value"], step)
        log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        self._memorization_guard(step, values.get("memorization"))
        return values

    def _memorization_guard(self, step: int, value: float | None):
        guard = self.cfg.checkpoint.max_memorization
        if not guard:
            return
        if self._count_memorized(value):
            return
        log.warning(
            "step %d: memorization %s > checkpoint.max_memorization %g: this evaluation cannot become checkpoints/best",
            step,
            "not measured" if value is None else f"{value:.4g}",
            guard,
        )

    def _count_memorized(self, value) -> bool:
        """Updates the run of evaluations above the guard; True when this one passed."""
        from hpcgan.checkpoint import passes_memorization_guard

        passed = passes_memorization_guard({"memorization": value}, self.cfg.checkpoint.max_memorization)
        self.memorized_in_a_row = 0 if passed else self.memorized_in_a_row + 1
        return passed

    def memorization_stop_due(self, step: int) -> bool:
        """train.stop_on_memorization: K evaluations in a row above the guard (rank 0's verdict, which the
        loop hands to every rank). Says so in one line when it is time to stop."""
        k = self.cfg.train.stop_on_memorization
        if not k or self.memorized_in_a_row < k:
            return False
        log.warning(
            "stopping at step %d: memorization above checkpoint.max_memorization %g in %d evaluations in a row "
            "(train.stop_on_memorization); writing the final checkpoint",
            step,
            self.cfg.checkpoint.max_memorization,
            self.memorized_in_a_row,
        )
        return True

    # --- checkpoints -----------------------------------------------------------------------------------
    def checkpoint_due_by_time(self) -> bool:
        minutes = self.cfg.checkpoint.every_minutes
        return bool(minutes) and time.monotonic() - self.last_checkpoint_time >= 60 * minutes

    def rollback(self, failed_step: int, count: int) -> dict | None:
        """Rank 0's part of train.nonfinite=rollback: the newest valid checkpoint up to `failed_step`
        (after the write in flight has landed), or None if there is none. metrics.jsonl is cut back to
        its step, as on a resume, and records the rollback."""
        from hpcgan.checkpoint import find_latest_valid, load_checkpoint

        self.checkpoints.flush()
        path = find_latest_valid(self.checkpoints.directory, max_step=failed_step)
        if path is None:
            return None
        state = load_checkpoint(path)
        self._trim_metrics(state["step"])
        self._append({"step": state["step"], "rollback": {"count": count, "failed_step": failed_step}})
        log.warning(
            "rollback %d: back to %s (step %d) after step %d; continuing with the next batches and new latents",
            count,
            path.name,
            state["step"],
            failed_step,
        )
        return state

    def checkpoint(self, state: dict, step: int, eval_values: dict | None):
        """Copies the state to host memory now and writes it in the background."""
        if self.init_from:
            state = {**state, "init_from": self.init_from}
        self.checkpoints.submit(state, step, metrics=eval_values)
        self.last_checkpoint_time = time.monotonic()


def environment(backend_info: dict) -> dict:
    import numpy

    info = {
        "hpcgan": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        **backend_info,
    }
    try:
        import horovod

        info["horovod"] = horovod.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    return info
