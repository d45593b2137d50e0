"""A bounded exit for a rank cut off from its peers (train.watchdog_s).

A network partition resets no connection: the rank on the far side waits in its collective until
Horovod's stall shutdown or the NCCL/Gloo timeout (train.collective_timeout_s, 30 minutes by default), and
under Slurm nobody else ends it (its node is declared down, its processes are not told). The backends
mark each collective with `waiting(name)`; a thread ends the rank with one line and EXIT_CUT_OFF once one
wait has lasted `limit_s`. The clock starts when this rank enters the collective, not at its previous
one: a rank that is computing (rank 0 evaluating, writing a checkpoint) is never ended, only the ranks
that wait for it, which is why the limit must exceed the longest of those duties.

NCCL collectives return at once and run on the GPU: `queued(name)` records a CUDA event after one,
and the wait lasts until the event completes, wherever the host blocks meanwhile (`.item()`, a sync).
The thread never touches the collectives; it needs the GIL for a moment per poll, which Gloo, Horovod's
wait, mpi4py and CUDA synchronisation all release while they block. Not marked: the collectives inside a
SyncBatchNorm's forward and backward (train.sync_bn, GPU), which the backend does not make itself."""

import collections
import contextlib
import logging
import os
import socket
import sys
import threading
import time

from hpcgan.errors import EXIT_CUT_OFF

# hpcgan.log.get_logger("watchdog"), without importing hpcgan.log: it imports hpcgan.parallel.
log = logging.getLogger("hpcgan.watchdog")


class NoWatchdog:
    """The watchdog of one process, or with train.watchdog_s=0: watches nothing."""

    limit_s = 0.0

    def waiting(self, name: str):
        return contextlib.nullcontext()

    def queued(self, name: str):
        pass

    def stop(self):
        pass


NO_WATCHDOG = NoWatchdog()


class CollectiveWatchdog(NoWatchdog):
    """Ends this process (os._exit: the main thread is stuck in C code) when one collective has waited
    `limit_s`; warns once per wait at half of it, so that a healthy job that comes close says so."""

    def __init__(self, limit_s: float, rank: int, prog: str = "hpcgan train"):
        self.limit_s, self.rank, self.prog = float(limit_s), rank, prog
        self.host = socket.gethostname()
        self.longest = (0.0, "none")  # (seconds, collective): the longest wait so far, logged at stop()
        self._host_wait = None  # (name, since): the collective the host is blocked in
        self._device_waits = collections.deque()  # (name, since, CUDA event) in stream order
        self._last_done = time.monotonic()
        self._warned = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpcgan-collective-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def waiting(self, name: str):
        """Marks the host's wait in one collective; a collective made of others counts as one wait."""
        if self._host_wait is not None:
            yield
            return
        since = time.monotonic()
        self._host_wait = (name, since)
        try:
            yield
        finally:
            self._host_wait = None
            self._done(name, since)

    def queued(self, name: str):
        """A collective just queued on the current CUDA stream: it waits until the GPU has run it."""
        import torch  # here: hpcgan.parallel is imported by light commands that must not pay for torch

        event = torch.cuda.Event()
        event.record()
        self._device_waits.append((name, time.monotonic(), event))

    def stop(self):
        """Stop watching (before the backend shuts down) and log the longest wait: the figure to compare
        with train.watchdog_s."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join(timeout=5)
        log.info("collective watchdog: longest wait %.1f s (%s), limit %g s", *self.longest, self.limit_s)

    def _done(self, name: str, since: float):
        now = time.monotonic()
        self._last_done = now
        if now - since > self.longest[0]:
            self.longest = (now - since, name)

    def _oldest_wait(self):
        """(name, since) of the oldest unfinished collective, host or device, or None."""
        waits = self._device_waits
        while waits and waits[0][2].query():  # only this thread pops; the main thread appends
            name, since, _ = waits.popleft()
            self._done(name, since)
        candidates = [w for w in (self._host_wait, waits[0][:2] if waits else None) if w is not None]
        return min(candidates, key=lambda w: w[1]) if candidates else None

    def _watch(self):
        while not self._stopped.wait(min(1.0, self.limit_s / 10)):
            wait = self._oldest_wait()
            if wait is None:
                continue
            name, since = wait
            waited = time.monotonic() - since
            if waited >= self.limit_s:
                self._end(name, waited)
            elif waited >= self.limit_s / 2 and self._warned != wait:
                self._warned = wait
                log.warning(
                    "rank %d on %s has waited %.0f s in %s for the other ranks; train.watchdog_s=%g ends it at "
                    "%g s (raise it if rank 0's evaluations or checkpoints take this long)",
                    self.rank,
                    self.host,
                    waited,
                    name,
                    self.limit_s,
                    self.limit_s,
                )

    def _end(self, name: str, waited: float):
        since_done = time.monotonic() - self._last_done
        sys.stderr.write(
            f"{self.prog}: error: rank {self.rank} on {self.host} has waited {waited:.0f} s in {name} for the "
            f"other ranks (last completed collective {since_done:.0f} s ago; train.watchdog_s={self.limit_s:g}): "
            f"cut off from its peers, ending it with exit {EXIT_CUT_OFF}\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_CUT_OFF)


def start_watchdog(limit_s: float, rank: int, world_size: int) -> NoWatchdog:
    """The watchdog for this rank: none for one process (nothing to wait for) or limit_s=0 (off)."""
    if world_size <= 1 or not limit_s:
        return NO_WATCHDOG
    return CollectiveWatchdog(limit_s, rank)
