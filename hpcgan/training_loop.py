"""The training loop, top to bottom. It sees the distributed job only through a backend
(hpcgan/parallel/backend.py) and leaves every rank-0 duty (files, logs, checkpoints, samples,
evaluation) to the coordinator.

Reproducibility contract (what makes 2 ranks equal 1 process and resume bit-exact):
- latents come from a generator seeded by (seed, step, G or D, rollbacks so far); each step draws the
  latents of the *global* batch and a rank takes its slice, so the sample a rank sees never depends on
  history;
- data order comes from RankSampler (seed, epoch); global batch k is the same on any world size;
- everything else random (dropout, D input noise, DiffAugment, the gradient-penalty mix) uses the
  per-rank torch RNG, whose state is saved for every rank in each checkpoint;
- batch-norm running statistics stay per rank too, and each rank's own are saved: averaging them in
  place at a checkpoint would make a run that stopped there differ from one that went on."""
import copy
import hashlib
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from hpcgan import __version__
from hpcgan.augment import diff_augment
from hpcgan.checkpoint import capture_rng_state, restore_rng_state
from hpcgan.config import to_dict
from hpcgan.data import make_loader
from hpcgan.errors import HpcganError, UsageError
from hpcgan.log import get_logger
from hpcgan.losses import clip_weights_, d_loss, g_loss
from hpcgan.networks import build_discriminator, build_generator

log = get_logger("train")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: preempted or out of time, checkpoint written, resume with --resume auto
# EX_DATAERR: a loss or the weights went NaN/inf on some rank (poisoned data or divergence) and
# train.nonfinite=stop (or its rollbacks ran out); nothing non-finite was checkpointed.
EXIT_NONFINITE = 65
# Below this the fp16 gradient scaler has overflowed step after step (2**16 halved 17 times, and
# gradients overflow float16 even unscaled): it skips every step and nothing trains any more.
MIN_FP16_SCALE = 1.0
# What can go non-finite, cause first: a NaN D loss on one rank makes every rank's D weights NaN
# (the gradient average), hence the G loss of every rank after it.
NONFINITE_KINDS = ("loss_d", "loss_g", "weights")


# --- small pieces ------------------------------------------------------------------------------------
def seed_for(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (seed, step, stream, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_rank(seed: int, rank: int, step: int = 0):
    """Per-rank global RNGs (torch, numpy, Python) for the random ops inside the step."""
    s = seed_for(seed, rank, step, 7)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


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
        raise UsageError(f"train.deterministic: model.resize_mode={resize_mode} has no deterministic CUDA backward "
                         "(torch refuses it); use model.resize_mode=nearest or train.deterministic=false")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a fixed cuBLAS workspace per stream
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def latent_slice(seed, step, stream, global_batch, latent_dim, num_classes, rank, batch, device):
    """This rank's slice of the global batch of latents (and fake class labels) for `step`. Drawn on the
    CPU (the same numbers on any device); on CUDA copied from pinned memory without waiting."""
    g = torch.Generator().manual_seed(seed_for(seed, step, stream))
    z = torch.randn(global_batch, latent_dim, generator=g)
    labels = torch.randint(0, max(num_classes, 1), (global_batch,), generator=g)
    part = slice(rank * batch, (rank + 1) * batch)
    z, labels = z[part], (labels[part] if num_classes else None)
    if device.type != "cuda":
        return z, labels
    # A non-blocking copy from pageable memory is a synchronous one; pinned, it overlaps the GPU's work.
    return (z.pin_memory().to(device, non_blocking=True),
            labels.pin_memory().to(device, non_blocking=True) if labels is not None else None)


def fixed_grid_latents(seed, n, latent_dim, num_classes, device):
    """The latents of the progress grid: the same at every step and on every resume."""
    g = torch.Generator().manual_seed(seed_for(seed, 2**31 - 1))
    z = torch.randn(n, latent_dim, generator=g).to(device)
    labels = (torch.arange(n) % num_classes).to(device) if num_classes else None
    return z, labels


def replica_digest(*modules) -> str:
    """sha256 of every parameter's bytes: equal on all ranks exactly when the replicas agree."""
    h = hashlib.sha256()
    for module in modules:
        for t in module.parameters():
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def nonfinite_reason(losses: dict, networks: dict, scalers: dict):
    """None when this rank's step is finite, else (kind, description), kind one of NONFINITE_KINDS:
    a loss that is NaN/inf here, or "weights" (a parameter or buffer is, or the fp16 scale fell below
    MIN_FP16_SCALE). Checked after the optimizer step: Adam turns one non-finite averaged gradient
    into non-finite weights on every rank, and batch-norm buffers take in a poisoned batch."""
    tensors = {name: [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
               for name, net in networks.items()}
    # A sum is NaN/inf when any term is (or past 3e38, where weights have diverged anyway): 30x faster
    # than isfinite().all() on a CPU (35 M parameters: 50 ms, not 1.5 s), one device-to-host copy.
    sums = [t.sum().float() for t in (*losses.values(), *(t for ts in tensors.values() for t in ts))]
    scales = {name: s.get_scale() for name, s in scalers.items() if s is not None}
    if bool(torch.isfinite(torch.stack(sums)).all()) and all(v >= MIN_FP16_SCALE for v in scales.values()):
        return None
    for name, loss in losses.items():
        if not torch.isfinite(loss).all():
            return name, f"{name} is {float(loss)}"
    for name, ts in tensors.items():
        if not all(torch.isfinite(t).all() for t in ts):
            return "weights", f"the weights of {name} are not finite"
    name, scale = min(scales.items(), key=lambda item: item[1])
    return "weights", f"the fp16 gradient scale of {name} fell to {scale:g} (every step overflows)"


def own_buffers(module) -> dict:
    """This rank's floating-point buffers that `module` saves (batch-norm running statistics)."""
    state = module.state_dict()
    return {name: b for name, b in module.named_buffers() if b.is_floating_point() and name in state}


@torch.no_grad()
def restore_own_buffers(state: dict, rank: int, world: int, G, D):
    """This rank's own batch-norm statistics from a checkpoint of the same world size; otherwise every
    rank keeps the mean over the old ranks that G and D were saved with."""
    saved = state.get("rank_buffers") or []
    if state.get("world_size") != world or rank >= len(saved):
        return
    for net, key in ((G, "G"), (D, "D")):
        for name, buffer in own_buffers(net).items():
            buffer.copy_(saved[rank][key][name])


@torch.no_grad()
def update_ema(G_ema, G, decay):
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.lerp_(p, 1.0 - decay)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def autocast_for(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


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


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    rollbacks: int = 0  # train.nonfinite=rollback: each one shifts the latent streams
    sums: dict = field(default_factory=dict)  # metric sums since the last log line
    count: int = 0
    data_wait_s: float = 0.0  # since the last log line
    sync_seconds: float = 0.0  # backend.sync_seconds at the last log line

    def add(self, stats: dict):
        # Summed as tensors: no device-to-host copy (and no GPU sync) until a log line is due.
        for k, v in stats.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def take(self) -> dict:
        out = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out


# --- the loop ----------------------------------------------------------------------------------------
def train(cfg, dataset_dir, manifest: dict, backend, coordinator=None, resume_state: dict | None = None) -> int:
    """Run `cfg.train.steps` steps (from a resumed state if given). Returns 0, EXIT_REQUEUE when a
    preemption signal stopped the run after a checkpoint, or EXIT_NONFINITE when NaN/inf stopped it
    (train.nonfinite). `coordinator` is given on rank 0 only."""
    rank, world, device = backend.rank, backend.world_size, backend.device
    tc, lc = cfg.train, cfg.loss
    batch, global_batch = tc.batch_size, tc.batch_size * world
    set_determinism(tc.deterministic, device, cfg.model.resize_mode)

    # Networks: same init on every rank (seeded), then rank 0's weights broadcast for certainty.
    torch.manual_seed(tc.seed)
    G = build_generator(cfg.model).to(device)
    D = build_discriminator(cfg.model).to(device)
    if tc.sync_bn and device.type == "cuda":
        G, D = backend.convert_sync_batchnorm(G), backend.convert_sync_batchnorm(D)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False) if tc.ema_decay > 0 else None
    scale = world if cfg.optim.scale_lr else 1
    lr_g, lr_d = (cfg.optim.lr_g or cfg.optim.lr) * scale, (cfg.optim.lr_d or cfg.optim.lr) * scale
    betas, wd = (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.weight_decay
    # Each optimizer is wrapped while all its parameters require grad (Horovod hooks only those).
    opt_G = backend.distributed_optimizer(torch.optim.Adam(G.parameters(), lr_g, betas, weight_decay=wd), G, "G")
    opt_D = backend.distributed_optimizer(torch.optim.Adam(D.parameters(), lr_d, betas, weight_decay=wd), D, "D")
    fp16 = tc.amp == "fp16"
    scaler_G = torch.amp.GradScaler(device.type) if fp16 else None
    scaler_D = torch.amp.GradScaler(device.type) if fp16 else None

    loader, sampler = make_loader(dataset_dir, "train", batch, rank, world, tc.seed, flip=tc.flip,
                                  labels=tc.labels, num_workers=tc.num_workers, pin_memory=device.type == "cuda")
    num_classes = cfg.model.num_classes
    p = Progress()
    if resume_state is not None:
        _load_state(resume_state, G, D, G_ema, opt_G, opt_D, scaler_G, scaler_D, p, sampler, tc, world)
    else:
        backend.broadcast_module(G)
        backend.broadcast_module(D)
        if G_ema is not None:
            G_ema.load_state_dict(G.state_dict())
    # What samples (grids, evaluation): G-EMA, or without EMA a copy of G that sync_buffers refreshes.
    G_sampling = G_ema if G_ema is not None else copy.deepcopy(G).eval().requires_grad_(False)
    sampler.set_epoch(p.epoch, p.batch_in_epoch)
    batches = iter(loader)
    if resume_state is not None and rank < len(resume_state["rng"]):
        restore_rng_state(resume_state["rng"][rank], device)
    else:
        seed_rank(tc.seed, rank, p.step)
    if resume_state is not None:
        restore_own_buffers(resume_state, rank, world, G, D)

    augment = (lambda x: diff_augment(x, tc.diffaugment)) if tc.diffaugment else (lambda x: x)

    def D_aug(x, labels=None):
        return D(augment(x), labels)

    amp = lambda: autocast_for(tc.amp, device)  # noqa: E731
    flag = PreemptionFlag()
    if coordinator:
        coordinator.start(p.step, G_sampling, fixed_grid_latents(tc.seed, cfg.log.grid_size, cfg.model.latent_dim,
                                                                  num_classes, device))

    def sync_buffers() -> dict:
        """Collective. Batch-norm statistics are per rank while training (they do not enter the
        gradients) and each rank keeps its own, so that a resumed rank continues exactly where it was.
        What is saved as G and D, and what samples, has their mean over ranks, identical everywhere (a
        broadcast from rank 0 would keep only rank 0's data). Returns those {"G": ..., "D": ...} states."""
        states = {}
        for name, net in (("G", G), ("D", D)):
            mean = backend.averaged_buffers(net)
            states[name] = {k: mean.get(k, v) for k, v in net.state_dict().items()}
        if G_ema is None:
            G_sampling.load_state_dict(states["G"])
        else:  # G-EMA takes G's statistics at every G step anyway: the mean can go in place
            with torch.no_grad():
                for name, buffer in G_ema.named_buffers():
                    if name in states["G"]:
                        buffer.copy_(states["G"][name])
        return states

    def snapshot():
        """Everything a bit-exact resume needs. Collective: every rank calls it."""
        states = sync_buffers()
        gathered = backend.gather_object({"rng": capture_rng_state(device), "replica": replica_digest(G, D),
                                          "buffers": {"G": own_buffers(G), "D": own_buffers(D)}})
        digests = [g["replica"] for g in gathered]
        if len(set(digests)) != 1:  # data parallelism's invariant: every rank holds the same weights
            raise HpcganError(f"step {p.step}: the ranks' weights have drifted apart (digests {digests}); "
                              "this is a bug or a faulty node, please report it with `hpcgan doctor` output")
        rngs = [g["rng"] for g in gathered]
        if not coordinator:
            return None
        return {"hpcgan_version": __version__, "config": to_dict(cfg), "dataset": dataset_info(manifest),
                "step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch, "world_size": world,
                "G": states["G"], "D": states["D"], "rank_buffers": [g["buffers"] for g in gathered],
                "G_ema": G_ema.state_dict() if G_ema else None,
                "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "scaler_G": scaler_G.state_dict() if scaler_G else None,
                "scaler_D": scaler_D.state_dict() if scaler_D else None, "rng": rngs, "replica_digest": digests[0],
                "rollbacks": p.rollbacks}

    exit_code = 0
    while p.step < tc.steps:
        # --- data ---
        t0 = time.perf_counter()
        try:
            real, real_labels = next(batches)
        except StopIteration:  # every rank has the same number of batches: they all turn here
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
            sampler.set_epoch(p.epoch)
            batches = iter(loader)
            continue
        real = real.to(device, non_blocking=True)
        real_labels = real_labels.to(device, non_blocking=True) if num_classes else None
        p.data_wait_s += time.perf_counter() - t0

        # --- D step: fakes without a graph through G, one backward for real + fake + penalty ---
        z, fake_labels = latent_slice(tc.seed, p.step, 2 * p.rollbacks, global_batch, cfg.model.latent_dim,
                                      num_classes, rank, batch, device)
        with torch.no_grad(), amp():
            fake = G(z, fake_labels)
        with amp():
            loss_D, stats = d_loss(lc, D_aug, real, fake, real_labels, fake_labels)
        opt_D.zero_grad()  # torch >= 2.0: grads set to None
        (scaler_D.scale(loss_D) if scaler_D else loss_D).backward()
        backend.step(opt_D, scaler_D)
        if lc.type == "wgan":
            clip_weights_(D, lc.clip_value)
        stats = {"loss_d": loss_D.detach(), **stats}
        losses = {"loss_d": stats["loss_d"]}

        # --- G step every n_critic steps, D frozen so its gradient hooks stay silent ---
        if (p.step + 1) % lc.n_critic == 0:
            D.requires_grad_(False)
            z, fake_labels = latent_slice(tc.seed, p.step, 2 * p.rollbacks + 1, global_batch,
                                          cfg.model.latent_dim, num_classes, rank, batch, device)
            with amp():
                loss_G, g_stats = g_loss(lc, D_aug, G(z, fake_labels), fake_labels)
            opt_G.zero_grad()  # torch >= 2.0: grads set to None
            (scaler_G.scale(loss_G) if scaler_G else loss_G).backward()
            backend.step(opt_G, scaler_G)
            D.requires_grad_(True)
            if G_ema is not None:
                update_ema(G_ema, G, min(tc.ema_decay, (1 + p.step) / (10 + p.step)))
            stats.update(loss_g=loss_G.detach(), **g_stats)
            losses["loss_g"] = stats["loss_g"]
        p.add(stats)
        p.step += 1
        p.batch_in_epoch += 1

        # --- agreement: one small collective per step (preemption anywhere, checkpoint clock on rank 0,
        # non-finite numbers anywhere: one slot per kind holding world - rank, so the max names the
        # lowest rank that saw it) ---
        if coordinator:
            coordinator.checkpoints.raise_if_failed()  # a failed write stops the job now (MPI abort)
        bad = nonfinite_reason(losses, {"G": G, "D": D}, {"G": scaler_G, "D": scaler_D})
        agreed = torch.tensor([float(flag.signum is not None),
                               float(bool(coordinator and coordinator.checkpoint_due_by_time())),
                               *(float(world - rank) if bad and bad[0] == kind else 0.0 for kind in NONFINITE_KINDS)])
        preempt, timed_checkpoint, *nonfinite = backend.allreduce_(agreed, "max").tolist()
        preempt, timed_checkpoint = bool(preempt), bool(timed_checkpoint)
        if any(nonfinite):
            reporter = world - int(next(v for v in nonfinite if v))  # of the first kind: the cause
            if not _recover_from_nonfinite(cfg, p, backend, coordinator, bad if rank == reporter else None,
                                           G, D, G_ema, opt_G, opt_D, scaler_G, scaler_D, sampler):
                exit_code = EXIT_NONFINITE
                break
            continue
        done = p.step == tc.steps

        if p.step % cfg.log.every_steps == 0 or done:
            metrics = backend.mean_metrics(p.take())
            waits = {"data": p.data_wait_s, "allreduce": backend.sync_seconds - p.sync_seconds}
            p.data_wait_s, p.sync_seconds = 0.0, backend.sync_seconds
            if coordinator:
                coordinator.log_train(p.step, p.epoch, metrics, global_batch, waits)
        if cfg.log.sample_every_steps and p.step % cfg.log.sample_every_steps == 0:
            sync_buffers()
            if coordinator:
                coordinator.save_grid(p.step, G_sampling)
        eval_results = None
        if cfg.eval.every_steps and (p.step % cfg.eval.every_steps == 0 or done):
            sync_buffers()
            eval_results = evaluate_during_training(cfg, G_sampling, backend, coordinator, p.step)
        ce = cfg.checkpoint.every_steps
        if preempt or done or timed_checkpoint or (ce and p.step % ce == 0):
            state = snapshot()
            if coordinator:
                coordinator.checkpoint(state, p.step, eval_results)
        if preempt:
            log.warning("preemption signal received: checkpoint written at step %d, exiting with %d",
                        p.step, EXIT_REQUEUE)
            exit_code = EXIT_REQUEUE
            break
    if coordinator:
        coordinator.finish(p.step, G_sampling, preempted=exit_code == EXIT_REQUEUE,
                           nonfinite=exit_code == EXIT_NONFINITE)
    if exit_code != EXIT_REQUEUE:
        # After a preemption the handlers stay: srun sends SIGTERM to the other ranks once the first
        # one exits 75, and that must not turn their orderly exit into a 143.
        flag.restore()
    backend.barrier()  # nobody leaves before rank 0 has flushed the last checkpoint
    return exit_code


def evaluate_during_training(cfg, G, backend, coordinator, step):
    """Generate `eval.num_images` with the sampling network and score them against the dataset.
    Rank 0 alone, or (eval.shared) each rank generates a part and rank 0 scores the whole."""
    n = cfg.eval.num_images
    if cfg.eval.shared:
        part = range(backend.rank, n, backend.world_size)
        images = generate(G, cfg, list(part), backend.device)
        gathered = backend.gather_object(images)
        if not coordinator:
            return None
        order = np.argsort(np.concatenate([np.arange(r, n, backend.world_size) for r in range(backend.world_size)]))
        images = np.concatenate([g.numpy() for g in gathered])[order]
    else:
        if not coordinator:
            return None
        images = generate(G, cfg, list(range(n)), backend.device).numpy()
    return coordinator.evaluate(step, images)


@torch.no_grad()
def generate(G, cfg, indices, device, batch_size=64) -> torch.Tensor:
    """Images number `indices` of the evaluation set: latent i is seeded by (seed, i), so the set is
    the same however it is split across ranks."""
    was_training = G.training
    G.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        z = torch.stack([torch.randn(cfg.model.latent_dim, generator=torch.Generator().manual_seed(
            seed_for(cfg.train.seed, 2**30, i))) for i in chunk]).to(device)
        labels = (torch.tensor(chunk) % cfg.model.num_classes).to(device) if cfg.model.num_classes else None
        out.append(G(z, labels).float().cpu())
    G.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, cfg.model.channels, cfg.model.resolution, cfg.model.resolution)


def dataset_info(manifest: dict) -> dict:
    """What sampling needs to know about the data: shapes and physical units, never paths or subjects."""
    keys = ("image_shape", "pixel_spacing_mm", "slice_thickness_mm", "intensity", "modalities", "dtype")
    return {k: manifest.get(k) for k in keys}


def _recover_from_nonfinite(cfg, p, backend, coordinator, bad, G, D, G_ema, opt_G, opt_D, scaler_G, scaler_D,
                            sampler) -> bool:
    """Collective, once every rank has agreed that step `p.step` went non-finite somewhere; `bad` is
    this rank's (kind, description) on the one rank that reports it, None elsewhere. Returns False to
    stop. With train.nonfinite=rollback (and rollbacks left) every rank reloads the newest valid
    checkpoint and returns True: the data stays where it is (the batches since that checkpoint, the
    failed one included, are not seen again) and the latents move to new streams, so the run does not
    walk into the same failure."""
    tc = cfg.train
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
    state = backend.broadcast_object(coordinator.rollback(p.step, p.rollbacks + 1) if coordinator else None)
    if state is None:
        if coordinator:
            log.error("step %d: no checkpoint to roll back to; stopping every rank (exit %d)", p.step, EXIT_NONFINITE)
        return False
    position, rollbacks = (p.epoch, p.batch_in_epoch), p.rollbacks + 1
    _load_state(state, G, D, G_ema, opt_G, opt_D, scaler_G, scaler_D, p, sampler, tc, backend.world_size)
    (p.epoch, p.batch_in_epoch), p.rollbacks = position, rollbacks
    if backend.rank < len(state["rng"]):
        restore_rng_state(state["rng"][backend.rank], backend.device)
    restore_own_buffers(state, backend.rank, backend.world_size, G, D)
    p.take()  # the abandoned steps' loss sums
    return True


def _load_state(state, G, D, G_ema, opt_G, opt_D, scaler_G, scaler_D, p, sampler, tc, world):
    G.load_state_dict(state["G"])
    D.load_state_dict(state["D"])
    if G_ema is not None:
        G_ema.load_state_dict(state["G_ema"] if state.get("G_ema") is not None else state["G"])
    opt_G.load_state_dict(state["opt_G"])
    opt_D.load_state_dict(state["opt_D"])
    for scaler, key in ((scaler_G, "scaler_G"), (scaler_D, "scaler_D")):
        if scaler is not None and state.get(key):
            scaler.load_state_dict(state[key])
    p.step, p.epoch, p.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    p.rollbacks = state.get("rollbacks", 0)
    old_global = state["config"]["train"]["batch_size"] * state["world_size"]
    if old_global != tc.batch_size * world:
        # A different world size (or batch): keep the number of samples already seen in this epoch.
        p.batch_in_epoch = p.batch_in_epoch * old_global // (tc.batch_size * world)
        log.warning("resuming a run of %d x %d images per step with %d x %d: continuing epoch %d at batch %d; "
                    "ranks beyond the old world start fresh random streams",
                    state["world_size"], state["config"]["train"]["batch_size"], world, tc.batch_size,
                    p.epoch, p.batch_in_epoch)
    p.batch_in_epoch = min(p.batch_in_epoch, sampler.batches_per_epoch)
