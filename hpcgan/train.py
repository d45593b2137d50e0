"""Train a GAN on a preprocessed dataset, on one process or many (one per GPU).

  hpcgan train --config wgan-gp-64 --data DATASET --out RUN_DIR
  mpirun -np 4 hpcgan train --config cepa2023 --data DATASET --out RUN_DIR --set train.steps=20000
  srun --mpi=pmix hpcgan train ... --resume auto

The config (a shipped name from configs/ or a YAML path, plus --set section.key=value) and the
dataset are checked on every rank before any collective starts: a bad key, value or dataset is
one line and exit 2. A preemption signal (SIGTERM, SIGUSR1) on any rank makes every rank
checkpoint at the next step and exit 75; run the same command with --resume auto to continue.

Fine-tuning: --init-from CHECKPOINT starts a new run (step 0, its own data, schedule and random streams) from
another run's networks (G, D, G-EMA), --init-from-optimizer also from its Adam moments; the model must
have the same shapes. The source is recorded by its sha256 (metrics.jsonl, every checkpoint)."""

from pathlib import Path

from hpcgan.errors import UsageError
from hpcgan.log import get_logger

log = get_logger("train")


def add_arguments(parser):
    from hpcgan.parallel import BACKENDS

    parser.add_argument(
        "--config",
        required=True,
        metavar="NAME_OR_YAML",
        help="a shipped config (cepa2023, dcgan-64, wgan-gp-64, hinge-sn-128) or a YAML file",
    )
    parser.add_argument("--data", required=True, metavar="DATASET_DIR", help="written by `hpcgan preprocess`")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=2000 (repeatable)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto: horovod with more than one process, else none (default: auto)",
    )
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="auto: newest valid checkpoint in RUN_DIR if any (else start fresh); or a checkpoint",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda:<local rank> when GPUs are visible, else the CPU",
    )
    parser.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="fine-tune: start this new run from another run's networks (a checkpoint, checkpoints/ or run "
        "directory: its newest); same model shapes, own step counter, data and schedule",
    )
    parser.add_argument(
        "--init-from-optimizer",
        action="store_true",
        help="with --init-from: also load its optimizer states (Adam moments; learning rates stay this config's)",
    )


def load_train_config(config, overrides):
    """The validated Config, with the cross-section checks a dataclass field cannot do alone."""
    from hpcgan.config import load_config
    from hpcgan.losses import check_loss_model
    from hpcgan.training.config import Config

    cfg = load_config(Config, config, overrides)
    try:
        check_loss_model(cfg.loss, cfg.model)
    except ValueError as exc:
        raise UsageError(f"{config}: {exc}") from None
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


def check_amp(cfg, device: str, config):
    """train.amp against the device training will use (--device auto: a GPU when one is visible)."""
    import torch

    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
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


def check_dataset(cfg, dataset_dir) -> dict:
    from hpcgan.data import check_mask_classes, load_manifest

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


def check_resume(args, run_dir):
    from hpcgan.checkpoint import resolve_checkpoint

    existing = run_dir / "checkpoints" / "latest"
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
    from hpcgan.checkpoint import peek_checkpoint, resolve_checkpoint

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
    import torch

    from hpcgan.config import to_dict
    from hpcgan.networks import build_discriminator, build_generator

    old, new = (source.get("config") or {}).get("model") or {}, to_dict(cfg)["model"]
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


def load_init_state(path, with_optimizer: bool, backend, resumed: dict | None):
    """--init-from after the backend started: rank 0 reads the checkpoint and its sha256, every rank receives
    (networks, record). `resumed`: the run's own checkpoint (--resume auto found one), which continues as it
    is if it was fine-tuned from the same file; networks is then None. Without --init-from: (None, the
    resumed run's record if it was fine-tuned)."""
    from hpcgan.checkpoint import load_checkpoint
    from hpcgan.io import sha256_file

    if path is None:
        return None, (resumed or {}).get("init_from")
    problem, init, record = None, None, None
    if backend.is_root:
        sha = sha256_file(path)
        if resumed is not None:
            record = resumed.get("init_from")
            if (record or {}).get("sha256") != sha:
                problem = (
                    f"--init-from {path}: the run in --out was not fine-tuned from this checkpoint; "
                    "use a new --out, or continue the run without --init-from"
                )
        else:
            try:
                source = load_checkpoint(path)
            except UsageError as exc:  # changed since check_init_from: the other ranks must not hang
                problem = str(exc)
            else:
                keys = ("G", "D", "G_ema", *(("opt_G", "opt_D") if with_optimizer else ()))
                init = {k: source.get(k) for k in keys}
                record = {"sha256": sha, "step": source.get("step"), "optimizer": with_optimizer}
                log.info("initialising from a checkpoint of step %s (sha256 %s)", record["step"], sha[:12])
    problem = backend.broadcast_object(problem)
    if problem:
        raise UsageError(problem)
    return backend.broadcast_object(init), backend.broadcast_object(record)


def run(args):
    from hpcgan.parallel import launch_env, make_backend
    from hpcgan.parallel.device_check import check_device_collectives
    from hpcgan.io import check_writable_dir

    # Everything that can be wrong with the input is found here, on every rank, before MPI starts.
    env = launch_env()
    cfg = load_train_config(args.config, args.set)
    check_amp(cfg, args.device, args.config)
    manifest = check_dataset(cfg, args.data)
    init_from = check_init_from(args, cfg)
    run_dir = Path(args.out)
    if env.rank == 0:
        check_writable_dir(run_dir)
    resume = check_resume(args, run_dir)
    _check_batches(cfg, manifest, env.world_size, args.data)

    backend = make_backend(
        args.backend,
        device=args.device,
        fp16_allreduce=cfg.train.fp16_allreduce,
        collective_timeout_s=cfg.train.collective_timeout_s,
    )
    checked = check_device_collectives(backend, sync_bn=cfg.train.sync_bn)
    state = load_resume_state(resume, run_dir, cfg, backend)
    init_state, init_record = load_init_state(init_from, args.init_from_optimizer, backend, state)
    log.info("%s backend, %d process(es), device %s; %s", backend.name, backend.world_size, backend.device, checked)

    from hpcgan.training.loop import run_training

    coordinator = None
    if backend.is_root:
        from hpcgan.training.coordinator import Coordinator

        coordinator = Coordinator(run_dir, cfg, args.data, backend.describe(), init_from=init_record)
    code = run_training(cfg, args.data, manifest, backend, coordinator, state, init_state)
    backend.shutdown()
    return code


def _check_batches(cfg, manifest, world_size, dataset_dir):
    slices = manifest["splits"]["train"]["slices"]
    global_batch = cfg.train.batch_size * world_size
    if slices < global_batch:
        raise UsageError(
            f"{dataset_dir}: {slices} training slices, fewer than one global batch "
            f"({world_size} ranks x train.batch_size {cfg.train.batch_size})"
        )


def load_resume_state(resume, run_dir, cfg, backend):
    """Rank 0 reads the checkpoint and every rank receives it. Refuses a checkpoint whose model or
    loss differs from the config; other sections (steps, intervals, learning rates) may change."""
    from hpcgan.checkpoint import find_latest_valid, load_checkpoint
    from hpcgan.config import to_dict
    from hpcgan.training.config import MODEL_SECTIONS

    if resume is None:
        return None
    problem, state = None, None
    if backend.is_root:
        path = find_latest_valid(run_dir / "checkpoints") if resume == "auto" else resume
        if path is None:
            log.info("--resume auto: no checkpoint in %s yet, starting fresh", run_dir)
        else:
            state = load_checkpoint(path)
            current = to_dict(cfg)
            for section in MODEL_SECTIONS:
                old, new = state["config"].get(section, {}), current[section]
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                if changed:
                    problem = (
                        f"{Path(path).name}: the checkpoint was trained with a different {section} "
                        f"({section}.{changed[0]}: {old.get(changed[0])!r} there, {new.get(changed[0])!r} now); "
                        "resume with the same model and loss, or start a new run"
                    )
                    break
            if problem is None:
                log.info("resuming from %s (step %d)", Path(path).name, state["step"])
    problem = backend.broadcast_object(problem)
    if problem:
        raise UsageError(problem)
    return backend.broadcast_object(state)
