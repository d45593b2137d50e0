"""Rank 0's run directory: the files a run leaves beside its checkpoints. Other ranks never touch RUN_DIR;
the handlers (hpcgan.training.handlers) write through one RunDirectory, made on rank 0 only.

RUN_DIR/
  config.yaml        the resolved config (no dataset path: it is a command-line argument)
  run.json           what the run was started from, for titles: the config's name and --set overrides, the
                     dataset folder's name and what the manifest says of it (never a path or a subject)
  env.json           versions, backend, world size, devices
  metrics.jsonl      one JSON object per line: training {"step", "epoch", "time_s", "images_per_s",
                     "data_wait", "allreduce_wait" (fractions of wall time), "loss_d", "loss_g", ...};
                     evaluation {"step", "eval": {...}}; fine-tuning {"step": 0, "init_from": {"sha256", ...}};
                     rollback {"step", "rollback": {"count", "failed_step"}}
  samples/grid-00001000.png   the fixed latents rendered by G-EMA every log.sample_every_steps
  checkpoints/       ckpt-00001000.pt, checkpoints.json, latest, best (hpcgan.training.checkpointing)
  tb/                TensorBoard events (log.tensorboard)"""

import json
import os
import platform
from pathlib import Path

import numpy
import torch
import yaml

from hpcgan import __version__
from hpcgan.config import to_dict
from hpcgan.io import read_jsonl, remove_temp_files, write_bytes_atomic, write_json_atomic
from hpcgan.log import get_logger

log = get_logger("train")

METRICS_FILE = "metrics.jsonl"  # fsynced before each checkpoint that describes it is renamed into place
RUN_FILE = "run.json"


def run_source(config, overrides, dataset_dir, manifest: dict) -> dict:
    """run.json: the config by its name (a shipped name, or the YAML file's stem) and its overrides, the dataset by
    its folder's name, modalities, image shape, slices and subjects per split and fingerprint."""
    return {
        "config": Path(config).stem,
        "overrides": list(overrides),
        "dataset": {
            "name": Path(os.path.abspath(dataset_dir)).name,
            "fingerprint": manifest.get("fingerprint"),
            "modalities": manifest.get("modalities"),
            "image_shape": manifest.get("image_shape"),
            "mask_classes": manifest.get("mask_classes"),
            "splits": {
                split: {"slices": entry.get("slices"), "subjects": entry.get("subjects")}
                for split, entry in manifest.get("splits", {}).items()
            },
        },
    }


class RunDirectory:
    def __init__(self, run_dir, cfg, backend_info: dict, source: dict):
        """Creates RUN_DIR and samples/, removes what an interrupted write left, writes config.yaml, run.json
        (`source`, from run_source) and env.json."""
        self.path = Path(run_dir)
        self.samples = self.path / "samples"
        self.metrics_path = self.path / METRICS_FILE
        self.samples.mkdir(parents=True, exist_ok=True)
        for directory in (self.path, self.samples):
            for name in remove_temp_files(directory):
                log.info("removed %s, left by an interrupted write", name)
        write_bytes_atomic(self.path / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
        write_json_atomic(self.path / RUN_FILE, source)
        env = environment(backend_info)
        write_json_atomic(self.path / "env.json", env)
        log.info(
            "environment: hpcgan %s, torch %s, %s backend, world %d, device %s%s",
            env["hpcgan"],
            env["torch"],
            env["backend"],
            env["world_size"],
            env["device"],
            f", GPUs {env['gpus']}" if env.get("gpus") else "",
        )
        self.tb = None  # TensorBoard's SummaryWriter while the run goes on (log.tensorboard)

    def append(self, record: dict):
        """One line of metrics.jsonl."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list:
        return read_jsonl(self.metrics_path)

    def trim_metrics(self, step: int):
        """On resume and rollback, drop lines logged after the checkpoint (they will be logged again) and a
        torn last line left by a killed job, so that the next line does not glue onto it."""
        if not self.metrics_path.exists():
            return
        kept = [record for record in read_jsonl(self.metrics_path) if record.get("step", 0) <= step]
        write_bytes_atomic(self.metrics_path, "".join(json.dumps(record) + "\n" for record in kept).encode())

    def open_tensorboard(self, step: int):
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is slow to import: only when asked

        # TensorBoard's event files are append-only logs too: purge_step hides the events a killed run
        # logged after the checkpoint this run resumes from.
        self.tb = SummaryWriter(str(self.path / "tb"), purge_step=step + 1 if step else None)

    def close(self):
        if self.tb:
            self.tb.close()


def environment(backend_info: dict) -> dict:
    info = {
        "hpcgan": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        **backend_info,
    }
    try:
        import horovod  # optional: recorded when installed

        info["horovod"] = horovod.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    return info
