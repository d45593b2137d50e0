"""Logging: every line carries the rank; only rank 0 speaks at INFO unless --debug."""

import logging
import sys

from hpcgan.parallel.env import launch_env

LOGGER_NAME = "hpcgan"


def setup_logging(debug: bool = False, rank: int | None = None, world_size: int | None = None):
    env = launch_env()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    if debug:
        level = logging.DEBUG
    else:
        level = logging.INFO if rank == 0 else logging.WARNING
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return logger


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")
