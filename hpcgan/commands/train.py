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

from hpcgan.io import check_writable_dir
from hpcgan.log import get_logger
from hpcgan.parallel import BACKENDS, launch_env, make_backend
from hpcgan.parallel.device_check import check_device_collectives
from hpcgan.training.checkpointing import Checkpointer
from hpcgan.training.checks import (
    check_amp,
    check_batches,
    check_dataset,
    check_deterministic,
    check_init_from,
    check_resume,
    load_train_config,
)
from hpcgan.training.loop import run_training
from hpcgan.training.run_directory import run_source

log = get_logger("train")


def add_arguments(parser):
    parser.add_argument(
        "--config",
        required=True,
        metavar="NAME_OR_YAML",
        help="a shipped config (cepa2023, dcgan-64, wgan-gp-64, hinge-sn-128, stylegan2-64, stylegan2-256) "
        "or a YAML file",
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


def run(args):
    # Everything that can be wrong with the input is found here, on every rank, before MPI starts.
    env = launch_env()
    cfg = load_train_config(args.config, args.set)
    check_amp(cfg, args.device, args.config)
    check_deterministic(cfg, args.device, args.config)
    manifest = check_dataset(cfg, args.data)
    init_from = check_init_from(args, cfg)
    run_dir = Path(args.out)
    if env.rank == 0:
        check_writable_dir(run_dir)
    resume = check_resume(args, run_dir)
    check_batches(cfg, manifest, env.world_size, args.data)

    backend = make_backend(
        args.backend,
        device=args.device,
        fp16_allreduce=cfg.train.fp16_allreduce,
        collective_timeout_s=cfg.train.collective_timeout_s,
        watchdog_s=cfg.train.watchdog_s,
    )
    checked = check_device_collectives(backend, sync_bn=cfg.train.sync_bn)
    checkpointer = Checkpointer(cfg, backend, run_dir, manifest)
    resume_state = checkpointer.load_resume(resume)
    init_state = checkpointer.load_init(init_from, args.init_from_optimizer, resume_state)
    log.info("%s backend, %d process(es), device %s; %s", backend.name, backend.world_size, backend.device, checked)
    source = run_source(args.config, args.set, args.data, manifest)
    code = run_training(cfg, args.data, backend, checkpointer, run_dir, source, resume_state, init_state)
    backend.shutdown()
    return code
