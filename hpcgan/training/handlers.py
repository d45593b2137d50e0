"""The periodic duties around the training steps, each a handler with one lifecycle, which the loop calls
for every handler alike and none by name:
  start()                      once, before the first step
  requests() -> {name: bool}   before each step's agreement collective: what this rank asks for (the loop
                               takes the max over ranks, so one rank's clock or signal decides for all)
  after_step(step, events)     after every step, with what every rank agreed (StepEvents)
  rolled_back(step, count, failed_step)   after train.nonfinite=rollback reloaded the checkpoint of `step`
  finish(exit_code)            once, at the end

Every rank runs every handler, because a duty begins with a collective (mean metrics, averaged batch-norm
statistics, a checkpoint snapshot, a shared evaluation); what it then writes is its own rank-0 part, through
`self.run`, rank 0's RunDirectory (hpcgan.training.run_directory; None on the other ranks)."""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hpcgan.data import read_slices
from hpcgan.errors import EXIT_NONFINITE, EXIT_REQUEUE
from hpcgan.generation import GRID_STREAM, draw_latents, generate_images, run_generator
from hpcgan.log import get_logger
from hpcgan.metrics import evaluate
from hpcgan.models import layer_summary
from hpcgan.models.layers import split_joint
from hpcgan.progress import progress_bar
from hpcgan.stacks import contact_sheet, write_png
from hpcgan.training.checkpointing import passes_memorization_guard

log = get_logger("train")


@dataclass
class StepEvents:
    """What every rank agreed on after a step (one collective, in the loop), and what the handlers tell the
    ones after them."""

    stats: dict = field(default_factory=dict)  # this step's losses and statistics (tensors or numbers)
    data_wait_s: float = 0.0  # how long this rank waited for the batch
    done: bool = False  # the last step of the run (an evaluation may make it so: memorisation stop)
    preempt: bool = False  # a preemption signal reached some rank: checkpoint and stop
    requested: dict = field(default_factory=dict)  # the handlers' requests(), agreed over ranks
    eval_values: dict | None = None  # this step's evaluation on rank 0, for the checkpoint of the same step
    stop: str | None = None  # why the run ends early and in order ("memorization"), exit 0


class Handler:
    def __init__(self, cfg, state, backend, run):
        self.cfg, self.state, self.backend, self.run = cfg, state, backend, run

    def start(self):
        pass

    def requests(self) -> dict:
        return {}

    def after_step(self, step: int, events: StepEvents):
        pass

    def rolled_back(self, step: int, count: int, failed_step: int):
        pass

    def finish(self, exit_code: int):
        pass


class RunRecord(Handler):
    """The run directory's own lines: metrics.jsonl cut back to the resumed step, the --init-from source at
    step 0, TensorBoard opened and closed, a rollback's record, and the last line of the run."""

    def __init__(self, *args, checkpointer):
        super().__init__(*args)
        self.checkpointer = checkpointer

    def start(self):
        if not self.run:
            return
        step = self.state.position.step
        for name, net in (("G", self.state.G), ("D", self.state.D)):
            log.info("\n".join(layer_summary(name, net, self.cfg.model.arch)))
        self.run.trim_metrics(step)
        if self.cfg.log.tensorboard:
            self.run.open_tensorboard(step)
        if step == 0 and self.checkpointer.init_from:
            self.run.append({"step": 0, "init_from": self.checkpointer.init_from})

    def rolled_back(self, step, count, failed_step):
        if self.run:
            self.run.trim_metrics(step)
            self.run.append({"step": step, "rollback": {"count": count, "failed_step": failed_step}})

    def finish(self, exit_code):
        if not self.run:
            return
        self.run.close()
        step = self.state.position.step
        if exit_code == EXIT_REQUEUE:
            log.info("run stopped for preemption at step %d; continue it with --resume auto", step)
        elif exit_code != EXIT_NONFINITE:  # after NaN/inf the rank that saw it has said why, in one line
            log.info("run finished at step %d: %s", step, self.run.path)


class TrainLog(Handler):
    """Loss statistics averaged over the steps since the last line and over ranks, with the time rank 0
    waited for data and for the gradient allreduce: metrics.jsonl, TensorBoard and the progress bar.
    With ADA also `r_t` (the overfitting heuristic, a step statistic like the losses) and `aug_p`."""

    def __init__(self, *args):
        super().__init__(*args)
        self.sums, self.counts, self.count, self.data_wait_s, self.sync_seconds = {}, {}, 0, 0.0, 0.0
        self.bar = None

    def start(self):
        step = self.state.position.step
        self.last_line = (time.perf_counter(), step)
        if self.run:
            self.bar = progress_bar(self.cfg.train.steps, "train", "steps", initial=step)

    def after_step(self, step, events):
        # Summed as tensors: no device-to-host copy (and no GPU sync) until a log line is due.
        for k, v in events.stats.items():  # a lazy regulariser's statistics come on its own steps only
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1
        self.data_wait_s += events.data_wait_s
        if step % self.cfg.log.every_steps == 0 or events.done:
            self.write_line(step)

    def rolled_back(self, step, count, failed_step):
        self.sums, self.counts, self.count = {}, {}, 0  # the abandoned steps' sums

    def finish(self, exit_code):
        if exit_code == 0 and self.count:  # an early, orderly end (memorisation stop): its last line
            self.write_line(self.state.position.step)
        if self.bar:
            self.bar.close()

    def write_line(self, step: int):
        """Collective: the mean over ranks of the sums since the last line."""
        metrics = self.backend.mean_metrics({k: float(v) / self.counts[k] for k, v in self.sums.items()})
        if self.state.ada is not None:  # ADA: p now (the same on every rank); r_t is a step statistic above
            metrics["aug_p"] = self.state.ada.p
        self.sums, self.counts, self.count = {}, {}, 0
        sync_seconds = self.backend.sync_seconds
        waits = {"data": self.data_wait_s, "allreduce": sync_seconds - self.sync_seconds}
        self.data_wait_s, self.sync_seconds = 0.0, sync_seconds
        if self.run:
            self._write(step, metrics, waits)

    def _write(self, step, metrics: dict, waits: dict):
        """`waits`: rank 0's seconds since the last line spent waiting for data and for the allreduce."""
        now, (t0, step0) = time.perf_counter(), self.last_line
        elapsed = max(now - t0, 1e-9)
        self.last_line = (now, step)
        global_batch = self.cfg.train.batch_size * self.backend.world_size
        line = {
            "step": step,
            "epoch": self.state.position.epoch,
            "time_s": round(time.time(), 3),
            "images_per_s": round((step - step0) * global_batch / elapsed, 2),
            **{f"{k}_wait": round(v / elapsed, 4) for k, v in waits.items()},
            **{k: round(v, 6) for k, v in metrics.items()},
        }
        self.run.append(line)
        if self.run.tb:
            for k, v in metrics.items():
                self.run.tb.add_scalar(f"train/{k}", v, step)
            self.run.tb.add_scalar("perf/images_per_s", line["images_per_s"], step)
        self.bar.n = step
        self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss_d", "loss_g") if k in metrics}, refresh=False)
        self.bar.refresh()


class SampleGrid(Handler):
    """The fixed latents rendered by the sampling network every log.sample_every_steps: at step 0, on the
    schedule, and at the end (unless NaN/inf ended the run)."""

    def start(self):
        m = self.cfg.model
        n = self.cfg.log.grid_size
        z = draw_latents(n, m.latent_dim, self.cfg.train.seed, GRID_STREAM)
        self.latents = (z, torch.arange(n) % m.num_classes if m.num_classes else None)
        if self.cfg.log.sample_every_steps and self.state.position.step == 0 and self.run:
            self.save(0)

    def after_step(self, step, events):
        every = self.cfg.log.sample_every_steps
        if every and step % every == 0:
            self.state.sync_buffers()
            if self.run:
                self.save(step)

    def finish(self, exit_code):
        every, step = self.cfg.log.sample_every_steps, self.state.position.step
        if self.run and every and step % every and exit_code != EXIT_NONFINITE:
            self.save(step)

    def save(self, step: int):
        z, labels = self.latents
        images = run_generator(self.state.G_sampling, z, labels, batch_size=max(1, len(z))).numpy()  # one batch
        images, masks = split_joint(images, self.cfg.model.channels)
        sheet = contact_sheet(images, nrow=max(1, int(len(images) ** 0.5)), masks=masks)
        write_png(sheet, self.run.samples / f"grid-{step:08d}.png")
        if self.run.tb:
            self.run.tb.add_image("samples", sheet if sheet.ndim == 3 else sheet[..., None], step, dataformats="HWC")


class Evaluation(Handler):
    """eval.metrics of eval.num_images generated by the sampling network, every eval.every_steps and at the
    end, scored by rank 0 against the dataset: metrics.jsonl, TensorBoard, one log line, and the values in
    `events.eval_values` for the checkpoint of the same step (which keeps the best). With
    checkpoint.max_memorization it counts the evaluations in a row above the guard, and with
    train.stop_on_memorization rank 0's verdict ends the run on every rank (events.done, events.stop)."""

    def __init__(self, *args, dataset_dir):
        super().__init__(*args)
        self.dataset_dir = dataset_dir
        self.reference = None  # rank 0: the real training and validation images, read once
        self.memorized_in_a_row = 0

    def start(self):
        if self.run and self.cfg.checkpoint.max_memorization and self.state.position.step:
            for record in self.run.records():  # a resumed run continues the count it had
                if isinstance(record.get("eval"), dict):
                    self._count_memorized((record["eval"].get("memorization") or {}).get("value"))

    def after_step(self, step, events):
        every = self.cfg.eval.every_steps
        if not every or (step % every and not events.done):
            return
        self.state.sync_buffers()
        images = self._generate()
        if self.run:
            events.eval_values = self._score(step, images)
        if self.cfg.train.stop_on_memorization and step % every == 0 and not events.done:
            verdict = self._memorization_stop_due(step) if self.run else None
            if self.backend.broadcast_object(verdict):
                events.done, events.stop = True, "memorization"  # the handlers after this one end the run

    def _generate(self):
        """The first eval.num_images of the run's image set (hpcgan.generation), on rank 0 (None elsewhere):
        rank 0 alone, or with eval.shared each rank a part, gathered."""
        n, seed, G = self.cfg.eval.num_images, self.cfg.train.seed, self.state.G_sampling
        backend = self.backend
        if not self.cfg.eval.shared:
            return generate_images(G, range(n), seed).numpy() if self.run else None
        parts = backend.gather_object(generate_images(G, range(backend.rank, n, backend.world_size), seed))
        if not self.run:
            return None
        order = np.argsort(np.concatenate([np.arange(r, n, backend.world_size) for r in range(backend.world_size)]))
        return np.concatenate([part.numpy() for part in parts])[order]

    def _score(self, step: int, images) -> dict:
        n, seed = self.cfg.eval.num_images, self.cfg.train.seed
        if self.reference is None:
            self.reference = (
                read_slices(self.dataset_dir, "train", max_items=n, seed=seed),
                read_slices(self.dataset_dir, "val", max_items=n, seed=seed),
            )
        train, val = self.reference
        images = images[:, : self.cfg.model.channels]  # joint mode: the image channels
        results = evaluate(images, train, val if len(val) else None, metrics=tuple(self.cfg.eval.metrics))
        self.run.append({"step": step, "eval": results})
        values = {}
        for name, r in results.items():
            if isinstance(r, dict) and isinstance(r.get("value"), (int, float)):
                values[name] = float(r["value"])
                if self.run.tb:
                    self.run.tb.add_scalar(f"eval/{name}", r["value"], step)
        log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        self._memorization_guard(step, values.get("memorization"))
        return values

    def _memorization_guard(self, step: int, value: float | None):
        guard = self.cfg.checkpoint.max_memorization
        if not guard or self._count_memorized(value):
            return
        log.warning(
            "step %d: memorization %s > checkpoint.max_memorization %g: this evaluation cannot become checkpoints/best",
            step,
            "not measured" if value is None else f"{value:.4g}",
            guard,
        )

    def _count_memorized(self, value) -> bool:
        """Updates the run of evaluations above the guard; True when this one passed."""
        passed = passes_memorization_guard({"memorization": value}, self.cfg.checkpoint.max_memorization)
        self.memorized_in_a_row = 0 if passed else self.memorized_in_a_row + 1
        return passed

    def _memorization_stop_due(self, step: int) -> bool:
        """K evaluations in a row above the guard (train.stop_on_memorization); says so in one line."""
        k = self.cfg.train.stop_on_memorization
        if self.memorized_in_a_row < k:
            return False
        log.warning(
            "stopping at step %d: memorization above checkpoint.max_memorization %g in %d evaluations in a row "
            "(train.stop_on_memorization); writing the final checkpoint",
            step,
            self.cfg.checkpoint.max_memorization,
            self.memorized_in_a_row,
        )
        return True


class Checkpoints(Handler):
    """A snapshot of every rank's state every checkpoint.every_steps, every checkpoint.every_minutes (rank 0's
    clock), at a preemption and at the end, written by rank 0 in the background (hpcgan.training.checkpointing)."""

    def __init__(self, *args, checkpointer):
        super().__init__(*args)
        self.checkpointer = checkpointer

    def requests(self):
        self.checkpointer.raise_if_failed()  # a failed write stops the job now, not after more steps
        return {"timed_checkpoint": self.checkpointer.due_by_time()}

    def after_step(self, step, events):
        every = self.cfg.checkpoint.every_steps
        if events.preempt or events.done or events.requested["timed_checkpoint"] or (every and step % every == 0):
            self.checkpointer.save(self.state.state_dict(), step, events.eval_values)

    def finish(self, exit_code):
        self.checkpointer.close()
        guard = self.cfg.checkpoint.max_memorization
        if self.run and guard and self.cfg.eval.every_steps and not self.checkpointer.has_best():
            log.warning(
                "no evaluated checkpoint passed the memorisation guard (memorization <= checkpoint.max_memorization "
                "%g): checkpoints/best is not written",
                guard,
            )
