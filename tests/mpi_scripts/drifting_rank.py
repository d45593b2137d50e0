"""Run under mpirun with `hpcgan train` arguments: the real command, except that rank 1 nudges one
weight after every optimizer step. Data parallelism's invariant broken on purpose: the replica check
must stop the job at its first checkpoint."""

import sys

import torch

from hpcgan.cli import main
from hpcgan.parallel.backend import Backend

original_step = Backend.step


def drifting_step(self, optimizer, scaler=None):
    original_step(self, optimizer, scaler)
    if self.rank == 1:
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].add_(1e-3)


Backend.step = drifting_step
sys.exit(main(sys.argv[1:]))
