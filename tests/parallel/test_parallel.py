"""The distributed layer (hpcgan/parallel): the launch environment of each launcher, both backends
against the single-process result, the group's unit split, and the rank on every log line."""

import json
import sys

import pytest
import torch

from conftest import REPO, requires_mpirun, run_cmd, run_hpcgan_mpi, run_python_mpi
from hpcgan.parallel.env import launch_env, slurm_ntasks

SCRIPTS = REPO / "tests" / "mpi_scripts"


# --- launch environment -----------------------------------------------------------------------------
def test_launch_env_reads_each_launcher():
    alone = launch_env({})  # no launcher: a single process
    assert (alone.rank, alone.world_size, alone.local_rank) == (0, 1, 0)
    assert (
        launch_env(
            {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
        ).local_rank
        == 1
    )
    env = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert launch_env({"PMI_RANK": "1", "PMI_SIZE": "2"}).rank == 1
    assert slurm_ntasks({"SLURM_NTASKS": "4"}) is None  # the batch script, not an srun step
    assert slurm_ntasks({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}) == 4


# --- backends: 2 ranks equal one process -----------------------------------------------------------------
@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_backend_two_ranks_match_single_process(backend, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run_cmd([sys.executable, SCRIPTS / "backend_check.py", "none", tmp_path / "one"], timeout=120, check=True)
    run_python_mpi(2, SCRIPTS / "backend_check.py", backend, tmp_path / "two", timeout=180, check=True)
    single = torch.load(tmp_path / "one" / "rank-0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "two" / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    for res in ranks:
        assert res["world"] == 2
        for key, value in single["params"].items():  # averaged gradients = full-batch gradients
            torch.testing.assert_close(res["params"][key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["mean"], torch.tensor([1.5, 5.0]))
        torch.testing.assert_close(res["sum"], torch.tensor([3.0]))
        torch.testing.assert_close(res["max"], torch.tensor([1.0]))
        torch.testing.assert_close(res["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        assert res["object"]["from"] == 0 and res["object"]["t"].tolist() == [0, 1, 2]
        assert res["all_objects"] == [{"rank": 0, "text": "x"}, {"rank": 1, "text": "xx"}]
        assert res["metrics"] == {"loss": 0.5}
    # Bit-identical across ranks, not merely close: the ranks must never drift apart.
    for key in single["params"]:
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key])


# --- the group's split of units of work (hpcgan/parallel/split.py) -----------------------------------
@pytest.mark.mpi
@requires_mpirun
def test_units_of_work_are_dealt_round_robin_and_every_rank_gets_all_results(tmp_path):
    run_python_mpi(3, REPO / "tests" / "mpi_scripts" / "split_check.py", tmp_path, check=True, timeout=120)
    expected = [[unit, unit % 3, unit * unit] for unit in range(10)]
    for rank in range(3):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) == expected


# --- logging under mpirun ---------------------------------------------------------------------------
@pytest.mark.mpi
@requires_mpirun
def test_log_lines_carry_the_rank():
    result = run_hpcgan_mpi(2, "doctor", "--debug", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "[rank 1/2]" in result.stderr and "[rank 0/2]" in result.stderr
