"""What can be wrong with a training run's input, found on every rank before MPI starts: the config (with
the checks across sections that one dataclass field cannot make), AMP and deterministic mode against the
device, the dataset against the model, the batch against the data, --resume and --init-from. Each is a
one-line UsageError."""

import torch

from hpcgan.augment import nondeterministic_ops, parse_ada_policy
from hpcgan.config import load_config, to_dict
from hpcgan.data import check_mask_classes
from hpcgan.errors import UsageError
from hpcgan.log import get_logger
from hpcgan.losses import check_loss_model
from hpcgan.models import build_discriminator, build_generator
from hpcgan.preprocess.manifest import load_manifest
from hpcgan.training.checkpointing import CHECKPOINTS_DIR, peek_checkpoint, resolve_checkpoint
from hpcgan.training.config import Config, saved_section

log = get_logger("train")


def load_train_config(config, overrides):
    """The validated Config, with the cross-section checks a dataclass field cannot do alone."""
    cfg = load_config(Config, config, overrides)
    try:
        check_loss_model(cfg.loss, cfg.model)
    except ValueError as exc:
        raise UsageError(f"{config}: {exc}") from None
    check_style_batch(cfg, config)
    if cfg.eval.every_steps and cfg.checkpoint.best_metric not in cfg.eval.metrics:
        raise UsageError(
            f"{config}: checkpoint.best_metric {cfg.checkpoint.best_metric!r} is not among "
            f"eval.metrics {cfg.eval.metrics}"
        )
    if cfg.checkpoint.max_memorization and not (cfg.eval.every_steps and "memorization" in cfg.eval.metrics):
        raise UsageError(
            f"{config}: checkpoint.max_memorization needs evaluation during training with the memorization "
            f"metric (eval.every_steps > 0, 'memorization' in eval.metrics {cfg.eval.metrics})"
        )
    if cfg.train.stop_on_memorization and not cfg.checkpoint.max_memorization:
        raise UsageError(f"{config}: train.stop_on_memorization needs its threshold, checkpoint.max_memorization > 0")
    return cfg


def check_style_batch(cfg, config):
    """StyleGAN2: the minibatch-std groups and the path-length batch divide each rank's batch (so that a rank's
    groups are those of its part of one process's batch)."""
    batch = cfg.train.batch_size
    if cfg.model.arch == "stylegan2" and batch % min(cfg.model.mbstd_group, batch):
        raise UsageError(
            f"{config}: model.mbstd_group {cfg.model.mbstd_group} does not divide train.batch_size {batch} (the "
            "per-rank batch): choose a group size that divides it"
        )
    if cfg.loss.type == "stylegan2" and cfg.loss.pl_weight and batch % cfg.loss.pl_batch_shrink:
        raise UsageError(
            f"{config}: loss.pl_batch_shrink {cfg.loss.pl_batch_shrink} does not divide train.batch_size {batch}"
        )


def _on_cuda(device: str) -> bool:
    """Whether training will run on a GPU: --device cuda, or auto where one is visible."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def check_amp(cfg, device: str, config):
    """train.amp against the device training will use (--device auto: a GPU when one is visible)."""
    on_cuda = _on_cuda(device)
    if cfg.train.amp == "fp16" and not on_cuda:
        raise UsageError(f"{config}: 'train.amp' fp16 needs CUDA (use bf16 on CPUs)")
    if cfg.train.amp == "bf16" and on_cuda and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise UsageError(
            f"{config}: 'train.amp' bf16 is not supported by {name} (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability()))} < 8.0): use fp16"
        )
    if cfg.train.fp16_allreduce and cfg.train.amp != "fp16":
        log.warning(
            "train.fp16_allreduce without train.amp=fp16: gradients below 6e-8 vanish in the fp16 "
            "allreduce (fp16 AMP's loss scaling keeps them in range)"
        )


def check_deterministic(cfg, device: str, config):
    """train.deterministic against ADA's ops on the device training will use: torch raises in the first
    backward of an op without a deterministic kernel, so refuse it here (hpcgan.augment.nondeterministic_ops)."""
    if not cfg.train.ada_target:
        return
    ops = parse_ada_policy(cfg.train.ada_policy)
    refused = nondeterministic_ops(ops, "cuda" if _on_cuda(device) else "cpu", cfg.train.deterministic)
    if refused:
        raise UsageError(
            f"{config}: train.deterministic=true on CUDA cannot run train.ada_policy ops {','.join(refused)} "
            "(grid_sample has no deterministic CUDA backward): drop them from train.ada_policy, "
            "or set train.deterministic=false"
        )


def check_dataset(cfg, dataset_dir) -> dict:
    manifest = load_manifest(dataset_dir)
    shape = list(manifest["image_shape"])
    want = [cfg.model.channels, cfg.model.resolution, cfg.model.resolution]
    if shape != want:
        raise UsageError(
            f"{dataset_dir}: images are {'x'.join(map(str, shape))} (C x H x W) but the model makes "
            f"{'x'.join(map(str, want))}: set model.channels/model.resolution or preprocess again"
        )
    if cfg.model.mask_classes:
        check_mask_classes(manifest, dataset_dir, cfg.model.mask_classes)
    if cfg.train.labels == "mask":
        if not manifest.get("has_masks"):
            raise UsageError(f"{dataset_dir}: train.labels=mask needs a dataset preprocessed with --mask")
        if cfg.model.num_classes != 2:
            raise UsageError(f"{dataset_dir}: train.labels=mask gives 2 classes; set model.num_classes=2")
    elif cfg.model.num_classes:
        raise UsageError(f"model.num_classes={cfg.model.num_classes} needs class labels: set train.labels=mask")
    if cfg.checkpoint.max_memorization and not manifest["splits"].get("val", {}).get("slices"):
        raise UsageError(
            f"{dataset_dir}: checkpoint.max_memorization needs a validation split (the memorization metric's "
            "threshold comes from it): preprocess with --val-fraction"
        )
    return manifest


def check_batches(cfg, manifest, world_size, dataset_dir):
    """At least one global batch of training slices."""
    slices = manifest["splits"]["train"]["slices"]
    global_batch = cfg.train.batch_size * world_size
    if slices < global_batch:
        raise UsageError(
            f"{dataset_dir}: {slices} training slices, fewer than one global batch "
            f"({world_size} ranks x train.batch_size {cfg.train.batch_size})"
        )


def check_resume(args, run_dir):
    """--resume: None (a fresh run, refused where RUN_DIR already holds one), "auto", or the checkpoint file."""
    existing = run_dir / CHECKPOINTS_DIR / "latest"
    if args.resume is None:
        if existing.exists():
            raise UsageError(f"{run_dir}: already holds a run; pass --resume auto to continue it, or a new --out")
        return None
    if args.resume == "auto":
        return "auto"
    return str(resolve_checkpoint(args.resume))


def check_init_from(args, cfg) -> str | None:
    """--init-from on every rank before anything starts: the checkpoint file, and a model whose networks have
    the shapes this config builds (read with mmap: the shapes without the data). Differing model keys that
    change no shape (dropout, noise, resize mode) are allowed with a warning: fine-tuning may change them."""
    if args.init_from_optimizer and not args.init_from:
        raise UsageError("--init-from-optimizer: needs --init-from CHECKPOINT")
    if not args.init_from:
        return None
    if args.resume not in (None, "auto"):
        raise UsageError(
            "--init-from: cannot be combined with --resume PATH (that continues another run); "
            "fine-tune into a new --out, and continue it with --resume auto"
        )
    path = resolve_checkpoint(args.init_from)
    source = peek_checkpoint(path)
    changed, problem = model_differences(source, cfg)
    if problem:
        key = changed[0] if changed else None
        where = f"model.{key}: {source['config']['model'].get(key)!r} there, {getattr(cfg.model, key, None)!r} now; "
        raise UsageError(
            f"--init-from {path}: the checkpoint's networks do not fit this model ({where if key else ''}{problem}); "
            "fine-tune with the same model config"
        )
    if changed:
        log.warning("--init-from: model keys differ but no shape does: %s", ", ".join(f"model.{k}" for k in changed))
    return str(path)


def model_differences(source: dict, cfg) -> tuple:
    """(model config keys that differ from the checkpoint's, the first network tensor whose name or shape
    differs, or None)."""
    old, new = saved_section(source.get("config"), "model"), to_dict(cfg)["model"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    with torch.device("meta"):  # shapes only, no memory
        nets = {"G": build_generator(cfg.model), "D": build_discriminator(cfg.model)}
    for name, net in nets.items():
        saved = source.get(name) or {}
        want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in saved.items()}
        for key in sorted(set(want) | set(have)):
            if want.get(key) != have.get(key):
                return changed, f"{name} tensor {key}: {have.get(key)} there, {want.get(key)} now"
    return changed, None
