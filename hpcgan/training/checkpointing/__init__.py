"""Checkpointing, one component: the files (format, index, pointers, validation, loading), rank 0's
background writer, and the Checkpointer through which a run saves, resumes, starts from another run
(--init-from) and rolls back. The training entries of a checkpoint are TrainState's (hpcgan.training.state:
the layout and the RNG states); the rest is written here.

A checkpoint is a dict saved by `torch.save` that loads with
`torch.load(path, map_location="cpu", weights_only=True)`: tensors, numbers, strings, lists,
tuples, dicts and None only, so a checkpoint from someone else cannot run code. Keys:
`format` ("hpcgan-checkpoint"), `format_version` (1), hpcgan_version, config, dataset (shapes and units,
never paths), init_from (a fine-tuned run's source), metrics, and TrainState's: step, epoch, batch_in_epoch,
world_size, rollbacks, G, D, G_ema, opt_G, opt_D, scaler_G, scaler_D, rng and rank_buffers (one entry per
rank), ada, replica_digest. G and D hold batch-norm statistics averaged over ranks (what sampling uses);
rank_buffers each rank's own, for an exact resume.

A checkpoint directory holds:
  ckpt-00001000.pt   one file per checkpoint, written to a temp name, fsynced, renamed
  checkpoints.json   index: [{file, step, sha256, metrics}], oldest first (written atomically)
  latest, best       a line with the file name of the newest / best checkpoint (replaced atomically); with
                     checkpoint.max_memorization, best is absent while no evaluated checkpoint passes the guard

The modules:
  files    format, index, pointers, best_entry and the memorisation guard, find_latest_valid, resolve (the
           newest, for --resume), select_checkpoint (the run's selection, for everything downstream), load
  writer   CheckpointWriter (rank 0, background, atomic, keep-K + best) and to_host
  manager  Checkpointer: save, and load for --resume, --init-from and rollback (rank 0 reads, all receive)"""

from hpcgan.training.checkpointing.files import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    CHECKPOINTS_DIR,
    INDEX_NAME,
    POINTERS,
    best_entry,
    checkpoint_name,
    find_latest_valid,
    load_checkpoint,
    passes_memorization_guard,
    peek_checkpoint,
    read_index,
    read_pointer,
    read_run_config,
    resolve_checkpoint,
    run_selection,
    select_checkpoint,
    selection_reason,
)
from hpcgan.training.checkpointing.manager import Checkpointer
from hpcgan.training.checkpointing.writer import CheckpointWriter, to_host

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINTS_DIR",
    "INDEX_NAME",
    "POINTERS",
    "best_entry",
    "checkpoint_name",
    "find_latest_valid",
    "load_checkpoint",
    "passes_memorization_guard",
    "peek_checkpoint",
    "read_index",
    "read_pointer",
    "read_run_config",
    "resolve_checkpoint",
    "run_selection",
    "select_checkpoint",
    "selection_reason",
    "Checkpointer",
    "CheckpointWriter",
    "to_host",
]
