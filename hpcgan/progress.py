"""Progress of long work, shown by rank 0: a tqdm bar on a terminal, plain log lines elsewhere.

Under Slurm (or any redirect) stderr is a file, and a bar would write a carriage-return line into the
job log every second. There `LineProgress` logs one ordinary line at each 10 % of the work and at
least every HPCGAN_PROGRESS_SECONDS (default 60) while work goes on. Both have tqdm's small interface
used here: `update(n)`, the `n` attribute with `refresh()`, `set_postfix`/`set_postfix_str`, `close()`
and use as a context manager."""

import os
import sys
import time

from hpcgan.log import get_logger

PERCENT_STEP = 10
DEFAULT_INTERVAL_S = 60.0


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0, stream=None):
    """A tqdm bar when `stream` (stderr) is a terminal, else a LineProgress; silent when not `enabled`
    (every rank but 0)."""
    stream = stream or sys.stderr
    if enabled and stream.isatty():
        from tqdm import tqdm

        return tqdm(
            total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True, mininterval=1.0
        )
    interval = float(os.environ.get("HPCGAN_PROGRESS_SECONDS", DEFAULT_INTERVAL_S))
    return LineProgress(total, desc, unit, initial=initial, enabled=enabled, interval_s=interval)


class LineProgress:
    """Logs "desc: n/total unit (p%), r unit/s, eta" at each PERCENT_STEP and every `interval_s`."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        enabled: bool = True,
        interval_s: float = DEFAULT_INTERVAL_S,
    ):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n = self.start_n = self.emitted_n = initial
        self.interval_s = interval_s
        self.postfix = ""
        self.started = self.last_time = time.monotonic()
        self.next_percent = self._percent(initial) // PERCENT_STEP * PERCENT_STEP + PERCENT_STEP
        self.log = get_logger("progress")

    def _percent(self, n) -> int:
        return 100 * n // self.total if self.total else 100

    def update(self, n: int = 1):
        self.n += n
        self.refresh()

    def set_postfix(self, values: dict, refresh: bool = True):
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()), refresh)

    def set_postfix_str(self, text: str, refresh: bool = True):
        self.postfix = text
        if refresh:
            self.refresh()

    def refresh(self):
        if not self.enabled:
            return
        now = time.monotonic()
        percent = self._percent(self.n)
        if percent >= self.next_percent or now - self.last_time >= self.interval_s:
            self._emit(now)
            self.next_percent = percent // PERCENT_STEP * PERCENT_STEP + PERCENT_STEP

    def _emit(self, now: float):
        self.last_time, self.emitted_n = now, self.n
        elapsed = now - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {self.n}/{self.total} {self.unit} ({self._percent(self.n)}%), {rate:.3g} {self.unit}/s"
        if rate > 0 and self.n < self.total:
            line += f", eta {format_seconds((self.total - self.n) / rate)}"
        if self.postfix:
            line += f", {self.postfix}"
        self.log.info("%s", line)

    def close(self):
        # The last line says where the work ended, also when it stopped short (a preemption).
        if self.enabled and self.n != self.emitted_n:
            self._emit(time.monotonic())
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
