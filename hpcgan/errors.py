"""The two kinds of failure a user sees, the exit codes they map to, and training's other exit codes."""

# EX_TEMPFAIL: preempted or out of time, checkpoint written, resume with --resume auto
EXIT_REQUEUE = 75
# EX_DATAERR: a loss or the weights went NaN/inf on some rank (poisoned data or divergence) and
# train.nonfinite=stop (or its rollbacks ran out); nothing non-finite was checkpointed.
EXIT_NONFINITE = 65
# EX_UNAVAILABLE: this rank waited train.watchdog_s in one collective for ranks it cannot reach (a network
# partition, a stopped peer): hpcgan.parallel.watchdog ended it.
EXIT_CUT_OFF = 69


class HpcganError(Exception):
    """A runtime failure: one line on stderr, exit 1."""

    exit_code = 1


class UsageError(HpcganError):
    """A usage or config error (bad flag, bad key, missing file): one line on stderr, exit 2."""

    exit_code = 2
