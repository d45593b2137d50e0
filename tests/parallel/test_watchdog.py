"""The collective watchdog (train.watchdog_s, hpcgan.parallel.watchdog): a rank that waits that long in one
collective for a peer that no longer takes part ends itself with one line and exit 69, on Horovod and on
torch.distributed, while ranks that compute longer than the limit, or wait less than it many times over,
and a real 2-rank training run with a short limit, end normally. The partition itself (a cut link between
two nodes) is test_network_partition_ends_the_job_and_the_cut_off_rank_by_its_watchdog in
tests/cluster/test_multinode.py."""

import re
import socket
import sys

import pytest

from conftest import REPO, mpirun_cmd, requires_mpirun, run_hpcgan_mpi, run_python_mpi, run_until_marker
from hpcgan.errors import EXIT_CUT_OFF, UsageError
from hpcgan.training.checks import load_train_config
from test_train import train_args

SCRIPT = REPO / "tests" / "mpi_scripts" / "cut_off_rank.py"
LIMIT_S = 10  # train.watchdog_s's minimum
MARGIN_S = 15  # the watchdog's poll (1 s) and mpirun ending the stopped rank, on a loaded 2-core machine


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("backend, collective", [("horovod", "allreduce"), ("torch", "all_reduce")])
def test_a_rank_waiting_for_a_stopped_peer_ends_itself_within_the_watchdog(backend, collective):
    """Rank 1 stops (SIGSTOP) outside any collective; rank 0, in an allreduce, ends itself after LIMIT_S with
    one line naming its rank, host, wait and collective (without it: Horovod's stall shutdown or Gloo's
    timeout, 30 minutes by default)."""
    cmd = mpirun_cmd(2) + [sys.executable, str(SCRIPT), "stopped", backend, str(LIMIT_S)]
    code, lines, seconds = run_until_marker(cmd, "rank 0 waits")
    output = "\n".join(lines)
    errors = [line for line in lines if ": error: " in line]
    assert code == EXIT_CUT_OFF, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert re.fullmatch(
        rf"hpcgan train: error: rank 0 on {re.escape(socket.gethostname())} has waited \d+ s in {collective} for "
        rf"the other ranks \(last completed collective \d+ s ago; train.watchdog_s={LIMIT_S}\): cut off from its "
        rf"peers, ending it with exit {EXIT_CUT_OFF}",
        errors[0],
    ), errors
    assert "Traceback" not in output and "the allreduce returned" not in output, output[-3000:]
    assert LIMIT_S <= seconds < LIMIT_S + MARGIN_S, f"ended {seconds:.1f} s after rank 0 began to wait"


@pytest.mark.mpi
@requires_mpirun
def test_computing_longer_than_the_watchdog_or_waiting_less_than_it_ends_no_rank():
    """Both ranks compute 1.5 x the limit between two collectives, then rank 1 waits 0.4 x the limit three
    times in a row for a busy rank 0: the clock is one wait, not the time since the last collective."""
    result = run_python_mpi(2, SCRIPT, "healthy", "horovod", LIMIT_S, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "rank 0 done" in result.stdout and "rank 1 done" in result.stdout, result.stdout
    longest = float(result.stdout.split("rank 1 done, longest wait ")[1].split()[0])
    assert 0.3 * LIMIT_S <= longest < LIMIT_S, result.stdout


@pytest.mark.mpi
@requires_mpirun
def test_a_healthy_two_rank_training_with_a_short_watchdog_completes(sample_dataset, tmp_path):
    """Start-up, the first step, checkpoints and rank 0's final evaluation all fit in 10 s of waiting here;
    every rank logs its longest wait (--debug: the other ranks log warnings only otherwise)."""
    run = tmp_path / "run"
    args = train_args(sample_dataset, run, 4, f"train.watchdog_s={LIMIT_S}", "checkpoint.every_steps=2")
    result = run_hpcgan_mpi(2, *args, "--set", "eval.every_steps=4", "--debug", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    longest = [line for line in result.stderr.splitlines() if "collective watchdog: longest wait" in line]
    assert len(longest) == 2 and all(f"limit {LIMIT_S} s" in line for line in longest), result.stderr[-3000:]
    assert (run / "checkpoints" / "ckpt-00000004.pt").exists()


def test_watchdog_s_is_validated():
    assert load_train_config("wgan-gp-64", []).train.watchdog_s == 300
    assert load_train_config("wgan-gp-64", ["train.watchdog_s=0"]).train.watchdog_s == 0
    with pytest.raises(UsageError, match=r"train.watchdog_s: must be 0 \(off\) or in \[10, .*got 5"):
        load_train_config("wgan-gp-64", ["train.watchdog_s=5"])
    with pytest.raises(UsageError, match=r"train.collective_timeout_s=1800\), got 1800"):
        load_train_config("wgan-gp-64", ["train.watchdog_s=1800"])
