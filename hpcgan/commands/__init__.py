"""The `hpcgan` commands, one module each: `add_arguments(parser)` and `run(args) -> int | None`, a thin
layer that parses flags, checks them and calls the library. hpcgan.cli's COMMANDS table is the one
place that lists them."""

import argparse

from hpcgan.io import GROUP_READABLE_ENV


# --checkpoint of the commands that read a run's results (sample, evaluate, turing-test make):
# hpcgan.training.checkpointing.select_checkpoint.
CHECKPOINT_HELP = (
    "a checkpoint file, or a run directory: its selected checkpoint (checkpoints/best, honouring the "
    "memorisation guard); RUN/checkpoints/latest for the newest"
)


def common_flags(top: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (and after a sub-action's, as in
    `turing-test make`). Below the top level they default to "absent", so that `hpcgan --debug COMMAND`
    is not undone by the command's own default."""
    default = False if top else argparse.SUPPRESS
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=default, help="log at DEBUG on every rank and show tracebacks"
    )
    common.add_argument(
        "--group-readable",
        action="store_true",
        default=default,
        help="write outputs readable by the group (directories 0750, files 0640) instead of private to you "
        f"(0700, 0600, the default whatever the umask); also {GROUP_READABLE_ENV}=1",
    )
    return common
