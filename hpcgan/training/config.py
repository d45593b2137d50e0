"""The training config: one YAML file (configs/*.yaml) with `--set section.key=value` overrides.

A *step* is one discriminator update on one batch per rank; the generator is updated every
`loss.n_critic` steps. `train.batch_size` is per rank (the reference study: 8 per GPU)."""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from hpcgan.augment import POLICIES, parse_ada_policy
from hpcgan.losses import LossConfig
from hpcgan.metrics import check_metric_names
from hpcgan.models.config import ModelConfig


@dataclass
class OptimConfig:
    lr: float = 2e-4
    lr_g: float | None = None  # separate learning rates (TTUR); default: lr
    lr_d: float | None = None
    beta1: float = 0.5
    beta2: float = 0.999
    # L2 added to the gradient (torch Adam's weight_decay = Chainer's WeightDecay hook), not AdamW.
    weight_decay: float = 0.0
    # Multiply learning rates by the world size: Horovod's advice for SGD; GAN references keep it fixed.
    scale_lr: bool = False

    def __post_init__(self):
        for key in ("lr", "lr_g", "lr_d"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"optim.{key}: must be > 0, got {value}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"optim.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    seed: int = 0
    ema_decay: float = 0.999  # exponential moving average of G's weights, used for sampling; 0 = off
    # Instead of ema_decay: G-EMA with a half-life of this many thousand images over all ranks (StyleGAN2's
    # ema_kimg), for at most ema_rampup x the images seen so far when that is > 0. 0 = use ema_decay.
    ema_kimg: float = 0.0
    ema_rampup: float = 0.0
    diffaugment: str = ""  # comma list of translation, cutout, color
    # ADA (Karras et al. 2020; hpcgan.augment): each op of ada_policy on each image D sees with probability p,
    # p steered by r_t = E[sign(D(real))] towards ada_target. 0 = off; 0.6 is the paper's value.
    ada_target: float = 0.0
    ada_policy: str = "translation,flip,rotate,scale,color"  # from flip, translation, scale, rotate, color, cutout
    ada_interval: int = 4  # D steps between updates of p
    # Images (over all ranks) for p to go from 0 to 1. Karras: 500k, for 10^4..10^5 images and 10^7 shown; a
    # small medical set overfits within a few thousand steps, so p must be able to answer within that time.
    ada_speed_images: int = 20000
    ada_p_max: float = 1.0  # the paper sees leaks beyond ~0.8 for some ops (hpcgan.augment)
    amp: Literal["none", "bf16", "fp16"] = "none"
    # fp16 gradient compression; gradients are divided by the world size before the cast (no overflow
    # of the fp16 sum of scaled AMP gradients).
    fp16_allreduce: bool = False
    sync_bn: bool = False  # hvd.SyncBatchNorm / torch SyncBatchNorm; GPU only
    labels: Literal["none", "mask"] = "none"  # conditional GAN: class = slice's mask has a lesion
    flip: bool = False
    # Data loader processes per rank (persistent, started by forkserver: forking after MPI/NCCL is unsafe).
    num_workers: int = 0
    # Deterministic CUDA kernels, no TF32, no cuDNN benchmarking: bit-exact runs on the same GPUs and software,
    # slower. CPU runs are deterministic either way (for a given number of threads).
    deterministic: bool = False
    # A NaN/inf loss or weight on any rank: stop every rank (exit 65, nothing non-finite checkpointed),
    # or roll back to the newest checkpoint and go on with the next data and new latents, at most
    # max_rollbacks times in the run before stopping.
    nonfinite: Literal["stop", "rollback"] = "stop"
    max_rollbacks: int = 3
    # How long a rank waits in one collective before the job is ended (NCCL/Gloo timeout, Horovod's stall
    # shutdown): longer than the slowest rank-0 duty (evaluation, checkpoint) that the others wait for.
    collective_timeout_s: float = 1800.0
    # A rank that waits this long in one collective ends itself (one line, exit 69; hpcgan.parallel.watchdog):
    # the bounded exit of a rank cut off by a network partition, which nothing else ends before the timeout
    # above. Longer than the slowest rank-0 evaluation or checkpoint that the other ranks wait for. 0 = off.
    watchdog_s: float = 300.0
    # Stop (exit 0, final checkpoint written) once K evaluations in a row are above checkpoint.max_memorization:
    # on a small dataset memorisation rarely goes back down. 0 = off.
    stop_on_memorization: int = 0

    @property
    def uses_ema(self) -> bool:
        return self.ema_decay > 0 or self.ema_kimg > 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps: must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size: must be >= 1, got {self.batch_size}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        for key in ("ema_kimg", "ema_rampup"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers: must be >= 0, got {self.num_workers}")
        if not self.collective_timeout_s >= 60:
            raise ValueError(f"train.collective_timeout_s: must be >= 60, got {self.collective_timeout_s}")
        if self.watchdog_s and not 10 <= self.watchdog_s < self.collective_timeout_s:
            raise ValueError(
                "train.watchdog_s: must be 0 (off) or in [10, "
                f"train.collective_timeout_s={self.collective_timeout_s:g}), got {self.watchdog_s}"
            )
        if self.max_rollbacks < 0:
            raise ValueError(f"train.max_rollbacks: must be >= 0, got {self.max_rollbacks}")
        if self.stop_on_memorization < 0:
            raise ValueError(f"train.stop_on_memorization: must be >= 0 (0 = off), got {self.stop_on_memorization}")
        unknown = [p for p in self.diffaugment.split(",") if p.strip() and p.strip() not in POLICIES]
        if unknown:
            raise ValueError(f"train.diffaugment: unknown policy '{unknown[0]}' (known: {', '.join(sorted(POLICIES))})")
        self._check_ada()

    def _check_ada(self):
        if not 0 <= self.ada_target < 1:
            raise ValueError(f"train.ada_target: must be in [0, 1) (0 = off), got {self.ada_target}")
        if self.ada_interval < 1:
            raise ValueError(f"train.ada_interval: must be >= 1, got {self.ada_interval}")
        if self.ada_speed_images < 1:
            raise ValueError(f"train.ada_speed_images: must be >= 1, got {self.ada_speed_images}")
        if not 0 < self.ada_p_max <= 1:
            raise ValueError(f"train.ada_p_max: must be in (0, 1], got {self.ada_p_max}")
        parse_ada_policy(self.ada_policy)
        if self.ada_target and self.diffaugment.strip():
            raise ValueError("train.ada_target: ADA and train.diffaugment are mutually exclusive; set one of them")


@dataclass
class LogConfig:
    every_steps: int = 10
    sample_every_steps: int = 100  # PNG grid of fixed latents; 0 = off
    grid_size: int = 64
    tensorboard: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"log.every_steps: must be >= 1, got {self.every_steps}")


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0 = only at the end (and on preemption)
    every_minutes: float = 0.0  # 0 = off
    keep: int = 3
    best_metric: str = "swd"
    # Memorisation guard, 0 = off: "best" is the best best_metric among the evaluations whose memorization value
    # (fraction of generated images nearer a training image than 99% of validation images) is <= this. An
    # absolute fraction: the validation baseline is ~1% by construction, so 0.05 means 5x what new images score.
    max_memorization: float = 0.0

    def __post_init__(self):
        if not 0 <= self.max_memorization < 1:
            raise ValueError(f"checkpoint.max_memorization: must be in [0, 1) (0 = off), got {self.max_memorization}")


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = off
    metrics: list[str] = field(default_factory=lambda: ["swd"])
    num_images: int = 256
    shared: bool = False  # split the evaluation across ranks instead of rank 0 alone

    def __post_init__(self):
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps: must be >= 0 (0 = off), got {self.every_steps}")
        check_metric_names(self.metrics, "eval.metrics", ValueError)
        if self.num_images < 2:
            raise ValueError(f"eval.num_images: must be >= 2, got {self.num_images}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Sections that define the networks and the objective: a checkpoint resumes only under the same ones.
MODEL_SECTIONS = ("model", "loss")


def saved_section(config: dict, section: str) -> dict:
    """A checkpoint's config `section` with the defaults of keys added since it was written (so that a key
    a newer hpcgan adds, at its default, is no change)."""
    defaults = dataclasses.asdict(Config())[section]
    return {**defaults, **((config or {}).get(section) or {})}
