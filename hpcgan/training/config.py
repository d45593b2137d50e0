"""The training config: one YAML file (configs/*.yaml) with `--set section.key=value` overrides.

A *step* is one discriminator update on one batch per rank; the generator is updated every
`loss.n_critic` steps. `train.batch_size` is per rank (the reference study: 8 per GPU)."""

from dataclasses import dataclass, field
from typing import Literal

from hpcgan.losses import LossConfig
from hpcgan.networks import ModelConfig


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
    diffaugment: str = ""  # comma list of translation, cutout, color
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

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps: must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size: must be >= 1, got {self.batch_size}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers: must be >= 0, got {self.num_workers}")
        if not self.collective_timeout_s >= 60:
            raise ValueError(f"train.collective_timeout_s: must be >= 60, got {self.collective_timeout_s}")
        if self.max_rollbacks < 0:
            raise ValueError(f"train.max_rollbacks: must be >= 0, got {self.max_rollbacks}")
        from hpcgan.augment import POLICIES

        unknown = [p for p in self.diffaugment.split(",") if p.strip() and p.strip() not in POLICIES]
        if unknown:
            raise ValueError(f"train.diffaugment: unknown policy '{unknown[0]}' (known: {', '.join(sorted(POLICIES))})")


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


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = off
    metrics: list[str] = field(default_factory=lambda: ["swd"])
    num_images: int = 256
    shared: bool = False  # split the evaluation across ranks instead of rank 0 alone

    def __post_init__(self):
        from hpcgan.metrics import check_metric_names

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
