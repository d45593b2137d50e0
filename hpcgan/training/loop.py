"""The training loop, top to bottom: a TrainState (hpcgan.training.state), the D and G steps
(hpcgan.training.steps), one agreement collective per step, and the periodic duties as handlers
(hpcgan.training.handlers), each with its rank-0 part, called through one lifecycle. It sees the distributed
job only through a backend (hpcgan.parallel.backend) and its checkpoints through a Checkpointer.

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
from hpcgan.errors import EXIT_NONFINITE, EXIT_REQUEUE, UsageError
from hpcgan.log import get_logger
from hpcgan.training.handlers import Checkpoints, Evaluation, RunRecord, SampleGrid, StepEvents, TrainLog
from hpcgan.training.run_directory import RunDirectory
from hpcgan.training.state import TrainState
from hpcgan.training.steps import NONFINITE_KINDS, GanSteps, seed_rank
from hpcgan.training.style_steps import StyleGAN2Steps

log = get_logger("train")


def run_training(cfg, dataset_dir, backend, checkpointer, run_dir, source, resume_state=None, init_state=None) -> int:
    """Run `cfg.train.steps` steps (from a resumed state if given; a fresh run from `init_state`'s networks
    with --init-from). Returns 0 (also when train.stop_on_memorization ended it early), EXIT_REQUEUE when
    a preemption signal stopped the run after a checkpoint, or EXIT_NONFINITE when NaN/inf stopped it
    (train.nonfinite). `source`: the run.json record (run_directory.run_source)."""
    tc, device = cfg.train, backend.device
    set_determinism(tc.deterministic, device, cfg.model.resize_mode)
    state, loader, sampler = start_state(cfg, dataset_dir, backend, resume_state, init_state)
    pos = state.position
    batches = iter(loader)

    steps = (StyleGAN2Steps if cfg.loss.type == "stylegan2" else GanSteps)(cfg, state, backend)
    run = RunDirectory(run_dir, cfg, backend.describe(), source) if backend.is_root else None
    duty = (cfg, state, backend, run)
    handlers = [
        RunRecord(*duty, checkpointer=checkpointer),  # first: it trims the metrics.jsonl Evaluation.start reads
        TrainLog(*duty),
        SampleGrid(*duty),
        Evaluation(*duty, dataset_dir=dataset_dir),  # before Checkpoints: its values go with the same step
        Checkpoints(*duty, checkpointer=checkpointer),
    ]
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
        pos.step += 1
        pos.batch_in_epoch += 1

        bad = steps.nonfinite(losses)
        preempt, requested, nonfinite = agree(backend, flag, handlers, bad)
        if any(nonfinite):
            reporter = backend.world_size - int(next(v for v in nonfinite if v))  # of the first kind: the cause
            if not recover_from_nonfinite(cfg, state, sampler, checkpointer, handlers, bad, reporter):
                exit_code = EXIT_NONFINITE
                break
            continue

        events = StepEvents(stats, data_wait_s, done=pos.step == tc.steps, preempt=preempt, requested=requested)
        for handler in handlers:
            handler.after_step(pos.step, events)
        if events.stop:  # train.stop_on_memorization: an orderly end after the final checkpoint, exit 0
            break
        if events.preempt:
            log.warning(
                "preemption signal received: checkpoint written at step %d, exiting with %d", pos.step, EXIT_REQUEUE
            )
            exit_code = EXIT_REQUEUE
            break
    for handler in reversed(handlers):  # the last started, the first finished: the run record closes last
        handler.finish(exit_code)
    if exit_code != EXIT_REQUEUE:
        # After a preemption the handlers stay: srun sends SIGTERM to the other ranks once the first
        # one exits 75, and that must not turn their orderly exit into a 143.
        flag.restore()
    backend.barrier()  # nobody leaves before rank 0 has flushed the last checkpoint
    return exit_code


def start_state(cfg, dataset_dir, backend, resume_state, init_state):
    """The TrainState where the run starts (resumed, fresh, or fresh from --init-from's networks), the data
    loader and its sampler at that position, and each rank's random streams."""
    tc = cfg.train
    state = TrainState(cfg, backend)
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
        pin_memory=backend.device.type == "cuda",
        mask_classes=cfg.model.mask_classes,
    )
    if resume_state is not None:
        state.load_state_dict(resume_state, sampler.batches_per_epoch)
    else:
        state.broadcast_initial()
        if init_state is not None:  # the same dict on every rank (broadcast): the replicas agree
            state.load_weights(init_state)
    if resume_state is None or backend.rank >= len(resume_state["rng"]):
        seed_rank(tc.seed, backend.rank, state.position.step)
    sampler.set_epoch(state.position.epoch, state.position.batch_in_epoch)
    return state, loader, sampler


def agree(backend, flag, handlers, bad) -> tuple:
    """The one small collective of a step: a preemption signal anywhere, the handlers' requests (rank 0's
    checkpoint clock), non-finite numbers anywhere (`bad`: this rank's (kind, description) or None; one slot
    per kind holding world - rank, so that the max names the lowest rank). Returns (preempt, {request:
    bool}, the non-finite slots)."""
    requests = {k: v for handler in handlers for k, v in handler.requests().items()}
    world = backend.world_size
    agreed = torch.tensor(
        [
            float(flag.signum is not None),
            *(float(v) for v in requests.values()),
            *(float(world - backend.rank) if bad and bad[0] == kind else 0.0 for kind in NONFINITE_KINDS),
        ]
    )
    preempt, *agreed = backend.allreduce_(agreed, "max").tolist()
    return bool(preempt), dict(zip(requests, map(bool, agreed))), agreed[len(requests) :]


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


def recover_from_nonfinite(cfg, state, sampler, checkpointer, handlers, bad, reporter: int) -> bool:
    """Collective, once every rank has agreed that step `p.step` went non-finite on some rank; `bad` is this
    rank's (kind, description), said by the lowest rank that saw it (`reporter`). Returns False to stop.
    With train.nonfinite=rollback (and rollbacks left) every rank reloads the newest valid checkpoint and
    returns True: the data stays where it is (the batches since that checkpoint, the failed one included,
    are not seen again) and the latents move to new streams, so the run does not walk into the same
    failure."""
    tc, backend, p = cfg.train, state.backend, state.position
    rolling_back = tc.nonfinite == "rollback" and p.rollbacks < tc.max_rollbacks
    if backend.rank == reporter:
        if rolling_back:
            action = f"rolling back to the newest checkpoint (rollback {p.rollbacks + 1} of {tc.max_rollbacks})"
        else:
            gave_up = f"giving up after {p.rollbacks} rollback(s); " if tc.nonfinite == "rollback" else ""
            action = f"{gave_up}stopping every rank without a checkpoint (exit {EXIT_NONFINITE})"
        log.error("step %d: %s on rank %d: %s", p.step, bad[1], backend.rank, action)
    if not rolling_back:
        return False
    failed_step, count = p.step, p.rollbacks + 1
    state_to_load = checkpointer.load_rollback(failed_step, count)
    if state_to_load is None:
        if backend.is_root:
            log.error("step %d: no checkpoint to roll back to; stopping every rank (exit %d)", p.step, EXIT_NONFINITE)
        return False
    position = (p.epoch, p.batch_in_epoch)
    state.load_state_dict(state_to_load, sampler.batches_per_epoch)
    (p.epoch, p.batch_in_epoch), p.rollbacks = position, count
    for handler in handlers:
        handler.rolled_back(p.step, count, failed_step)
    return True
