"""What the benchmark scripts share (not a benchmark itself: `make bench` skips it): the environment
of a measured process and running a step that must succeed."""

import os
import subprocess
import sys


def single_thread_env() -> dict:
    """One thread per process (so ranks do not fight over the cores), unbuffered output, and Open MPI
    allowed to run as root without shared-memory single-copy (containers)."""
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl_vader_single_copy_mechanism="none",
    )


def sh(cmd, timeout=1800) -> str:
    """stdout of `cmd`; exits with the end of its stderr when it fails."""
    result = subprocess.run(
        [str(c) for c in cmd], env=single_thread_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        sys.exit(f"benchmark step failed: {' '.join(map(str, cmd))}\n{result.stderr[-3000:]}")
    return result.stdout
