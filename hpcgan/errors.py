"""The two kinds of failure a user sees, and the exit codes they map to."""


class HpcganError(Exception):
    """A runtime failure: one line on stderr, exit 1."""

    exit_code = 1


class UsageError(HpcganError):
    """A usage or config error (bad flag, bad key, missing file): one line on stderr, exit 2."""

    exit_code = 2
