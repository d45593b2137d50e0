"""The training loop, top to bottom: a TrainState (hpcgan.training.state), the D and G steps
(hpcgan.training.steps), one agreement collective per step, and the periodic duties as handlers
(hpcgan.training.handlers) whose rank-0 part the coordinator writes. It sees the distributed job only
through a backend (hpcgan.parallel.backend).

Reproducibility contract (what makes 2 ranks equal 1 process and resume bit-exact): the latents of a
step come from (seed, step, stream) and are sliced from the global batch (steps.py); data order comes
from RankSampler (seed, epoch), global batch k being the same on any world size; everything else
random uses the per-rank RNGs, saved per rank in each checkpoint; batch-norm running statistics stay
per rank too, and each rank's own are saved (state.py)."""

import os
import signal
import time

import torch

from hpcgan.data import make_loader
from hpcgan.errors import UsageError
from hpcgan.log import get_logger
from hpcgan.training.handlers import Checkpoints, Evaluation, RunDirectory, SampleGrid, StepEvents, TrainLog
from hpcgan.training.state import TrainState
from hpcgan.training.steps import NONFINITE_KINDS, GanSteps, seed_rank

log = get_logger("train")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: preempted or out of time, checkpoint written, resume with --resume auto
# EX_DATAERR: a loss or the weights went NaN/inf on some rank (poisoned data or divergence) and
# train.nonfinite=stop (or its rollbacks ran out); nothing non-finite was checkpointed.
EXIT_NONFINITE = 65


def run_training(
    cfg,
    dataset_dir,
    manifest: dict,
    backend,
    coordinator=None,
    resume_state: dict | None = None,
    init_state: dict | None = None,
) -> int:
    """Run `cfg.train.steps` steps (from a resumed state if given; a fresh run from `init_state`'s networks
    with --init-from). Returns 0 (also when train.stop_on_memorization ended it early), EXIT_REQUEUE when
    a preemption signal stopped the run after a checkpoint, or EXIT_NONFINITE when NaN/inf stopped it
    (train.nonfinite). `coordinator` is given on rank 0 only."""
    tc, device = cfg.train, backend.device
    set_determinism(tc.deterministic, device, cfg.model.resize_mode)
    state = TrainState(cfg, backend)
    pos = state.position
    loader, sampler = make_loader(
        dataset_dir,
        "train",
        tc.batch_size,
        backend.rank,
        backend.world_size,
        tc.seed,
        flip=tc.flip,
        labels=tc.labels,
        num_workers=tc.num_workers,
        pin_memory=device.type == "cuda",
        mask_classes=cfg.model.mask_classes,
    )
    if resume_state is not None:
        state.load_state_dict(resume_state, sampler.batches_per_epoch)
    else:
        state.broadcast_initial()
        if init_state is not None:  # the same dict on every rank (broadcast): the replicas agree
            state.load_weights(init_state)
    if resume_state is None or backend.rank >= len(resume_state["rng"]):
        seed_rank(tc.seed, backend.rank, pos.step)
    sampler.set_epoch(pos.epoch, pos.batch_in_epoch)
    batches = iter(loader)

    steps = GanSteps(cfg, state, backend)
    duty = (cfg, state, backend, coordinator)
    train_log, evaluation = TrainLog(*duty), Evaluation(*duty)
    checkpoints = Checkpoints(*duty, manifest, evaluation)
    handlers = [RunDirectory(*duty), train_log, SampleGrid(*duty), evaluation, checkpoints]
    flag = PreemptionFlag()
    for handler in handlers:
        handler.start()

    exit_code = 0
    while pos.step < tc.steps:
        t0 = time.perf_counter()
        try:
            real, real_labels = next(batches)
        except StopIteration:  # every rank has the same number of batches: they all turn here
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
            sampler.set_epoch(pos.epoch)
            batches = iter(loader)
            continue
        real = real.to(device, non_blocking=True)
        real_labels = real_labels.to(device, non_blocking=True) if cfg.model.num_classes else None
        data_wait_s = time.perf_counter() - t0

        stats = steps.d_step(real, real_labels)
        losses = {"loss_d": stats["loss_d"]}
        if steps.g_step_due():
            stats.update(steps.g_step())
            losses["loss_g"] = stats["loss_g"]
        train_log.add(stats, data_wait_s)
        pos.step += 1
        pos.batch_in_epoch += 1

        # One small collective per step: preemption anywhere, the checkpoint clock on rank 0, non-finite
        # numbers anywhere (one slot per kind holding world - rank, so the max names the lowest rank).
        checkpoints.raise_if_failed()
        bad, world = steps.nonfinite(losses), backend.world_size
        agreed = torch.tensor(
            [
                float(flag.signum is not None),
                float(checkpoints.due_by_time()),
                *(float(world - backend.rank) if bad and bad[0] == kind else 0.0 for kind in NONFINITE_KINDS),
            ]
        )
        preempt, timed_checkpoint, *nonfinite = backend.allreduce_(agreed, "max").tolist()
        if any(nonfinite):
            reporter = world - int(next(v for v in nonfinite if v))  # of the first kind: the cause
            if not recover_from_nonfinite(cfg, state, sampler, coordinator, bad if backend.rank == reporter else None):
                exit_code = EXIT_NONFINITE
                break
            train_log.discard()  # the abandoned steps' loss sums
            continue

        events = StepEvents(done=pos.step == tc.steps, preempt=bool(preempt), timed_checkpoint=bool(timed_checkpoint))
        memorized = False
        for handler in handlers:
            handler.after_step(pos.step, events)
            if handler is evaluation and not events.done and memorization_stop(cfg, backend, coordinator, pos.step):
                events.done = memorized = True  # the handlers after the evaluation end the run: final checkpoint
        if memorized:  # train.stop_on_memorization: an orderly end, exit 0
            if pos.step % cfg.log.every_steps:  # the last log line, as at the end of a run
                train_log.after_step(pos.step, events)
            break
        if events.preempt:
            log.warning(
                "preemption signal received: checkpoint written at step %d, exiting with %d", pos.step, EXIT_REQUEUE
            )
            exit_code = EXIT_REQUEUE
            break
    for handler in handlers:
        handler.finish(exit_code)
    if exit_code != EXIT_REQUEUE:
        # After a preemption the handlers stay: srun sends SIGTERM to the other ranks once the first
        # one exits 75, and that must not turn their orderly exit into a 143.
        flag.restore()
    backend.barrier()  # nobody leaves before rank 0 has flushed the last checkpoint
    return exit_code


def memorization_stop(cfg, backend, coordinator, step: int) -> bool:
    """Collective after each periodic evaluation when train.stop_on_memorization is on: rank 0's verdict
    (K evaluations in a row above checkpoint.max_memorization) reaches every rank, so all stop together."""
    every = cfg.eval.every_steps
    if not cfg.train.stop_on_memorization or not every or step % every:
        return False
    return bool(backend.broadcast_object(coordinator.memorization_stop_due(step) if coordinator else None))


def set_determinism(deterministic: bool, device: torch.device, resize_mode: str = "nearest"):
    """train.deterministic: the same weights from the same seed on the same GPUs and software, at some
    speed. CUDA's defaults are not: cuDNN picks convolution algorithms by timing them (benchmark) and
    some use atomics, scatter/index backward kernels add in arrival order, and TF32 rounds fp32 matmuls
    and convolutions to 10 mantissa bits. Off: torch's defaults, plus cuDNN benchmarking on CUDA (the
    input shapes never change, so the timing pays once). Call before the first CUDA matmul: cuBLAS
    reads CUBLAS_WORKSPACE_CONFIG when it creates its handle."""
    if not deterministic:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return
    if device.type == "cuda" and resize_mode != "nearest":
        # torch raises in the middle of the first backward: say so before anything starts.
        raise UsageError(
            f"train.deterministic: model.resize_mode={resize_mode} has no deterministic CUDA backward "
            "(torch refuses it); use model.resize_mode=nearest or train.deterministic=false"
        )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a fixed cuBLAS workspace per stream
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


class PreemptionFlag:
    """SIGTERM/SIGUSR1 set a flag; the loop checks it at the next step boundary (on every rank,
    through one collective), so all ranks checkpoint and stop together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def recover_from_nonfinite(cfg, state, sampler, coordinator, bad) -> bool:
    """Collective, once every rank has agreed that step `p.step` went non-finite somewhere; `bad` is
    this rank's (kind, description) on the one rank that reports it, None elsewhere. Returns False to
    stop. With train.nonfinite=rollback (and rollbacks left) every rank reloads the newest valid
    checkpoint and returns True: the data stays where it is (the batches since that checkpoint, the
    failed one included, are not seen again) and the latents move to new streams, so the run does not
    walk into the same failure."""
    tc, backend, p = cfg.train, state.backend, state.position
    rolling_back = tc.nonfinite == "rollback" and p.rollbacks < tc.max_rollbacks
    if bad is not None:
        if rolling_back:
            action = f"rolling back to the newest checkpoint (rollback {p.rollbacks + 1} of {tc.max_rollbacks})"
        else:
            gave_up = f"giving up after {p.rollbacks} rollback(s); " if tc.nonfinite == "rollback" else ""
            action = f"{gave_up}stopping every rank without a checkpoint (exit {EXIT_NONFINITE})"
        log.error("step %d: %s on rank %d: %s", p.step, bad[1], backend.rank, action)
    if not rolling_back:
        return False
    state_to_load = backend.broadcast_object(coordinator.rollback(p.step, p.rollbacks + 1) if coordinator else None)
    if state_to_load is None:
        if coordinator:
            log.error("step %d: no checkpoint to roll back to; stopping every rank (exit %d)", p.step, EXIT_NONFINITE)
        return False
    position, rollbacks = (p.epoch, p.batch_in_epoch), p.rollbacks + 1
    state.load_state_dict(state_to_load, sampler.batches_per_epoch)
    (p.epoch, p.batch_in_epoch), p.rollbacks = position, rollbacks
    return True
