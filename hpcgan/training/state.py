"""Everything a training run is, in one object that saves and loads itself: the networks, their
optimizers and fp16 gradient scalers, the position in the data, and the random streams.

`TrainState.state_dict(backend)` is the checkpoint's training part and `load_state_dict` its exact
inverse, used for --resume and for train.nonfinite=rollback alike. The checkpoint layout is written
here and nowhere else (hpcgan.training.checkpointing stores it and adds the config and dataset info):
  step, epoch, batch_in_epoch, world_size, rollbacks   the position
  G, D          the networks, batch-norm statistics averaged over ranks (what sampling uses)
  rank_buffers  each rank's own batch-norm statistics, for an exact resume on the same world size
  G_ema         the moving average of G (None without EMA)
  opt_G, opt_D, scaler_G, scaler_D   optimizer and scaler states (scalers: None without fp16)
  rng           each rank's RNG states (torch, its own CUDA device, numpy, Python)
  ada           train.ada_target > 0: {p, sign_sum, count}, the augmentation probability (the same on
                every rank) and the sign(D(real)) sum over ranks since its last update; None without ADA
  replica_digest  sha256 of the weights, equal on every rank when the checkpoint was taken
  pl_mean       StyleGAN2's path-length target (0 for other recipes), the same on every rank"""

import copy
import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from hpcgan.augment import AdaptiveAugment
from hpcgan.errors import HpcganError
from hpcgan.log import get_logger
from hpcgan.losses import lazy_ratio
from hpcgan.models import build_discriminator, build_generator

log = get_logger("train")


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    rollbacks: int = 0  # train.nonfinite=rollback: each one moves the latents to new streams


class TrainState:
    def __init__(self, cfg, backend):
        """The networks seeded by train.seed (the same on every rank), SyncBatchNorm on GPUs if asked,
        the optimizers wrapped for gradient averaging, and fp16 scalers."""
        tc, device, world = cfg.train, backend.device, backend.world_size
        torch.manual_seed(tc.seed)
        G = build_generator(cfg.model).to(device)
        D = build_discriminator(cfg.model).to(device)
        if tc.sync_bn and device.type == "cuda":
            G, D = backend.convert_sync_batchnorm(G), backend.convert_sync_batchnorm(D)
        self.G, self.D = G, D
        self.G_ema = copy.deepcopy(G).eval().requires_grad_(False) if tc.uses_ema else None
        # What samples (grids, evaluation): G-EMA, or without EMA a copy of G that sync_buffers refreshes.
        self.G_sampling = self.G_ema if self.G_ema is not None else copy.deepcopy(G).eval().requires_grad_(False)
        o, lc = cfg.optim, cfg.loss
        scale = world if o.scale_lr else 1

        def adam(net, lr, ratio):  # ratio: the lazy-regularisation correction (1 without one)
            betas = (o.beta1**ratio, o.beta2**ratio)
            return torch.optim.Adam(net.parameters(), lr * scale * ratio, betas, weight_decay=o.weight_decay)

        stylegan2 = lc.type == "stylegan2"
        ratio_G = lazy_ratio(lc.pl_interval, lc.pl_weight) if stylegan2 else 1.0
        ratio_D = lazy_ratio(lc.r1_interval, lc.r1_gamma) if stylegan2 else 1.0
        # Each optimizer is wrapped while all its parameters require grad (Horovod hooks only those).
        self.opt_G = backend.distributed_optimizer(adam(G, o.lr_g or o.lr, ratio_G), G, "G")
        self.opt_D = backend.distributed_optimizer(adam(D, o.lr_d or o.lr, ratio_D), D, "D")
        # StyleGAN2's path-length target, the running mean over every rank's path lengths (the same everywhere).
        self.pl_mean = torch.zeros([], device=device)
        fp16 = tc.amp == "fp16"
        self.scaler_G = torch.amp.GradScaler(device.type) if fp16 else None
        self.scaler_D = torch.amp.GradScaler(device.type) if fp16 else None
        self.position = Position()
        self.backend, self.batch_size = backend, tc.batch_size
        self.ada = (
            AdaptiveAugment(tc.ada_policy, tc.ada_target, tc.ada_interval, tc.ada_speed_images, tc.ada_p_max)
            if tc.ada_target > 0
            else None
        )

    def broadcast_initial(self):
        """A fresh run: rank 0's initial weights everywhere (the seeded init already agrees; this makes
        sure), and the sampling copy (G-EMA when there is one) starting from them."""
        self.backend.broadcast_module(self.G)
        self.backend.broadcast_module(self.D)
        self.G_sampling.load_state_dict(self.G.state_dict())

    # --- batch-norm statistics ----------------------------------------------------------------------
    def sync_buffers(self) -> dict:
        """Collective. Batch-norm statistics are per rank while training (they do not enter the
        gradients) and each rank keeps its own, so that a resumed rank continues exactly where it was.
        What is saved as G and D, and what samples, has their mean over ranks, identical everywhere (a
        broadcast from rank 0 would keep only rank 0's data). Returns those {"G": ..., "D": ...} states."""
        states = {}
        for name, net in (("G", self.G), ("D", self.D)):
            mean = self.backend.averaged_buffers(net)
            states[name] = {k: mean.get(k, v) for k, v in net.state_dict().items()}
        if self.G_ema is None:
            self.G_sampling.load_state_dict(states["G"])
        else:  # G-EMA takes G's statistics at every G step anyway: the mean can go in place
            with torch.no_grad():
                for name, buffer in self.G_ema.named_buffers():
                    if name in states["G"]:
                        buffer.copy_(states["G"][name])
        return states

    # --- save and load ------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """Collective: every rank calls it. The checkpoint's training entries on rank 0, None elsewhere.
        Refuses to save replicas whose weights have drifted apart (data parallelism's invariant)."""
        backend, pos = self.backend, self.position
        states = self.sync_buffers()
        gathered = backend.gather_object(
            {
                "rng": capture_rng_state(backend.device),
                "replica": replica_digest(self.G, self.D),
                "buffers": {"G": own_buffers(self.G), "D": own_buffers(self.D)},
                **({"ada": (self.ada.p, *self.ada.local_totals())} if self.ada else {}),
            }
        )
        digests = [g["replica"] for g in gathered]
        if len(set(digests)) != 1:
            raise HpcganError(
                f"step {pos.step}: the ranks' weights have drifted apart (digests {digests}); "
                "this is a bug or a faulty node, please report it with `hpcgan doctor` output"
            )
        ada = self._gathered_ada([g.get("ada") for g in gathered])
        if not backend.is_root:
            return None
        return {
            "step": pos.step,
            "epoch": pos.epoch,
            "batch_in_epoch": pos.batch_in_epoch,
            "world_size": backend.world_size,
            "rollbacks": pos.rollbacks,
            "G": states["G"],
            "D": states["D"],
            "rank_buffers": [g["buffers"] for g in gathered],
            "G_ema": self.G_ema.state_dict() if self.G_ema else None,
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "scaler_G": self.scaler_G.state_dict() if self.scaler_G else None,
            "scaler_D": self.scaler_D.state_dict() if self.scaler_D else None,
            "rng": [g["rng"] for g in gathered],
            "replica_digest": digests[0],
            "ada": ada,
            "pl_mean": self.pl_mean.detach().cpu(),
        }

    def _gathered_ada(self, per_rank: list) -> dict | None:
        """The checkpoint's ADA entry from every rank's (p, sign sum, count); refuses ranks whose p differ."""
        if self.ada is None:
            return None
        ps = [entry[0] for entry in per_rank]
        if len(set(ps)) != 1:
            raise HpcganError(
                f"step {self.position.step}: the ranks' augmentation probabilities differ ({ps}); "
                "this is a bug, please report it with `hpcgan doctor` output"
            )
        # Whole numbers: the sum over ranks is exact, and restored on rank 0 alone it sums the same again.
        return {"p": ps[0], "sign_sum": sum(e[1] for e in per_rank), "count": sum(e[2] for e in per_rank)}

    def load_state_dict(self, state: dict, batches_per_epoch: int):
        """The exact inverse of state_dict on the same world size. On another world size (or batch) the
        data position is rescaled to the samples already seen, and ranks beyond the old world keep fresh
        random streams and the mean batch-norm statistics."""
        backend, pos = self.backend, self.position
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        if self.G_ema is not None:
            self.G_ema.load_state_dict(state["G_ema"] if state.get("G_ema") is not None else state["G"])
        else:
            self.G_sampling.load_state_dict(state["G"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        for scaler, key in ((self.scaler_G, "scaler_G"), (self.scaler_D, "scaler_D")):
            if scaler is not None and state.get(key):
                scaler.load_state_dict(state[key])
        if state.get("pl_mean") is not None:
            self.pl_mean.copy_(state["pl_mean"])
        pos.step, pos.epoch, pos.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        pos.rollbacks = state.get("rollbacks", 0)
        old_batch, world = state["config"]["train"]["batch_size"], backend.world_size
        if old_batch * state["world_size"] != self.batch_size * world:
            # A different world size (or batch): keep the number of samples already seen in this epoch.
            pos.batch_in_epoch = pos.batch_in_epoch * old_batch * state["world_size"] // (self.batch_size * world)
            log.warning(
                "resuming a run of %d x %d images per step with %d x %d: continuing epoch %d at batch %d; "
                "ranks beyond the old world start fresh random streams",
                state["world_size"],
                old_batch,
                world,
                self.batch_size,
                pos.epoch,
                pos.batch_in_epoch,
            )
        pos.batch_in_epoch = min(pos.batch_in_epoch, batches_per_epoch)
        if backend.rank < len(state["rng"]):
            restore_rng_state(state["rng"][backend.rank], backend.device)
        self._restore_own_buffers(state)
        if self.ada is not None:
            # A checkpoint without ADA (older, or trained without it) starts p at 0, as a fresh run does.
            saved = state.get("ada") or {"p": 0.0, "sign_sum": 0.0, "count": 0}
            self.ada.p = min(float(saved["p"]), self.ada.p_max)
            root = backend.rank == 0  # the interval's totals so far, counted once
            self.ada.sign_sum, self.ada.count = (saved["sign_sum"], saved["count"]) if root else (0.0, 0)

    def load_weights(self, init: dict):
        """--init-from: another run's G, D and G-EMA (G where it has none), and with opt_G/opt_D their
        per-parameter Adam moments under this config's learning rates and betas. Nothing of its position,
        RNG or scalers: the fine-tuning run starts at step 0 with its own."""
        self.G.load_state_dict(init["G"])
        self.D.load_state_dict(init["D"])
        sampling = init.get("G_ema") if self.G_ema is not None and init.get("G_ema") is not None else init["G"]
        self.G_sampling.load_state_dict(sampling)
        for opt, key in ((self.opt_G, "opt_G"), (self.opt_D, "opt_D")):
            if init.get(key) is not None:
                opt.load_state_dict({"state": init[key]["state"], "param_groups": opt.state_dict()["param_groups"]})

    @torch.no_grad()
    def _restore_own_buffers(self, state: dict):
        """This rank's own batch-norm statistics from a checkpoint of the same world size; otherwise every
        rank keeps the mean over the old ranks that G and D were saved with."""
        saved, rank = state.get("rank_buffers") or [], self.backend.rank
        if state.get("world_size") != self.backend.world_size or rank >= len(saved):
            return
        for net, key in ((self.G, "G"), (self.D, "D")):
            for name, buffer in own_buffers(net).items():
                buffer.copy_(saved[rank][key][name])


def own_buffers(module) -> dict:
    """This rank's floating-point buffers that `module` saves (batch-norm running statistics)."""
    state = module.state_dict()
    return {name: b for name, b in module.named_buffers() if b.is_floating_point() and name in state}


def replica_digest(*modules) -> str:
    """sha256 of every parameter's bytes: equal on all ranks exactly when the replicas agree."""
    h = hashlib.sha256()
    for module in modules:
        for t in module.parameters():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- RNG state


def _cuda_device(device) -> torch.device | None:
    """The CUDA device whose RNG a rank owns: `device` if it is one, the current CUDA device when
    none is given and CUDA is available, else None (a CPU rank)."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def capture_rng_state(device=None) -> dict:
    """This process's RNG states (torch CPU, the rank's own CUDA device, numpy global, Python
    `random`) as tensors, ints, floats and lists only, so that weights_only loading accepts them.
    Only the rank's own CUDA generator is saved: the others belong to other ranks, and a list indexed
    by device number would hand a rank someone else's stream after a resume that sees the GPUs in
    another order or number (CUDA_VISIBLE_DEVICES per rank, another node layout)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = _cuda_device(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(cuda) if cuda is not None else None,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict, device=None):
    """Exact inverse of `capture_rng_state`; the saved CUDA state goes into this rank's own device
    (none on a CPU rank; a CUDA rank resuming a CPU run keeps its seeded CUDA stream)."""
    torch.set_rng_state(state["torch"])
    cuda, saved = _cuda_device(device), state.get("cuda")
    if isinstance(saved, (list, tuple)):
        # Older checkpoints hold every visible device's state. A rank used cuda:<local rank mod count>, so
        # under the same visibility its own stream is the entry of its current device index; with one
        # device per rank visible it is the only entry. Other layouts cannot be told apart: entry 0.
        index = cuda.index if cuda is not None and cuda.index < len(saved) else 0
        saved = saved[index] if saved else None
    if cuda is not None and saved is not None:
        torch.cuda.set_rng_state(saved, cuda)
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
