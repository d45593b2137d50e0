"""Everything distributed lives in this package; the rest of hpcgan sees the ranks of a job through
one model, a *group*, and nothing of MPI, Horovod or torch.distributed.

A group (`group.Group`) says where this process sits (`rank`, `world_size`, `is_root`) and offers
the collectives every command needs: `gather_object`, `broadcast_object`, `barrier`, `abort`.
- Preprocess, sample, evaluate and the metrics run on `world_group()`: one process, or an `MpiGroup`
  over mpi4py's COMM_WORLD; `split.map_units` spreads independent units of work over it.
- Training runs on a *backend* (`backend.Backend`, `make_backend`), a group with more on top: a
  device per local rank, tensor collectives, gradient averaging through `distributed_optimizer` and
  `step`, parameter broadcasts. Horovod (`horovod_backend`) and torch.distributed (`torch_backend`)
  implement it; the training loop knows only that interface.

The modules:
  env            where this process sits, read from the launcher's environment before MPI starts
  group          Group, MpiGroup, world_group()
  split          map_units: unit i on rank i % world_size, every rank gets all results in order
  mpi            mpi_comm(): MPI's settings before it starts, and COMM_WORLD
  launch         make_backend(): the training backend, with world and GPU checks at start-up
  backend        the training interface and its one-process implementation
  horovod_backend, torch_backend   its distributed implementations
  device_check   the collectives on the training device at every start (NCCL, SyncBatchNorm)
  failure        how a job fails together: abort_job, CollectiveError, lost_a_peer
  watchdog       the bounded exit of a rank cut off from its peers (train.watchdog_s): one wait too long
"""

from hpcgan.parallel.env import LaunchEnv, launch_env, slurm_ntasks
from hpcgan.parallel.failure import PEER_FAILURE_GRACE_S, CollectiveError, abort_job, lost_a_peer
from hpcgan.parallel.group import Group, MpiGroup, world_group
from hpcgan.parallel.launch import BACKENDS, make_backend
from hpcgan.parallel.mpi import mpi_comm

__all__ = [
    "LaunchEnv",
    "launch_env",
    "slurm_ntasks",
    "PEER_FAILURE_GRACE_S",
    "CollectiveError",
    "abort_job",
    "lost_a_peer",
    "Group",
    "MpiGroup",
    "world_group",
    "BACKENDS",
    "make_backend",
    "mpi_comm",
]
