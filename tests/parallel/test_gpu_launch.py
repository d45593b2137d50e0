"""GPU launch checks: no silent CPU training where GPUs are expected, no two ranks on one GPU,
torch threads from Slurm's --cpus-per-task, and torchrun under srun.

This machine has no GPU: a GPU node is simulated by monkeypatching torch.cuda and torch.version.cuda
(the only monkeypatching allowed here); launchers are simulated by their environment variables,
except torchrun, which runs for real.
"""

import os
import sys

import pytest
import torch

from conftest import REPO, mpi_env, run_cmd
from hpcgan.parallel import make_backend
from hpcgan.parallel.backend import pick_device
from hpcgan.parallel.env import launch_env, local_world_size, slurm_ntasks, slurm_threads

LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD", "PMI_", "PMIX_", "MPI_LOCAL", "SLURM_", "HOROVOD_", "TORCHELASTIC_")
LAUNCHER_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
)


@pytest.fixture
def launch(monkeypatch):
    """A clean launcher environment; call it with the variables a launcher would set."""
    for key in list(os.environ):
        if key.startswith(LAUNCHER_PREFIXES) or key in LAUNCHER_KEYS:
            monkeypatch.delenv(key)

    def set_env(**variables):
        for key, value in variables.items():
            monkeypatch.setenv(key, str(value))

    return set_env


@pytest.fixture
def gpu_node(monkeypatch):
    """A CUDA build of torch on a node where it sees `gpus(n)` GPUs; the devices it sets are recorded."""
    chosen = []
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)

    def gpus(count):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        return chosen

    return gpus


def train_argv(dataset, out, *extra):
    return ["train", "--config", "wgan-gp-64", "--data", str(dataset), "--out", str(out), *extra]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- a CUDA torch that sees no GPU -----------------------------------------------------------------
def test_cuda_torch_without_a_gpu_refuses_to_train_on_the_cpu(
    cli_in_process, sample_dataset, tmp_path, capsys, launch, gpu_node
):
    """A job submitted without --gpus…: exit 2 and one line saying what to do, instead of CPU training."""
    launch()
    gpu_node(0)
    assert cli_in_process(train_argv(sample_dataset, tmp_path / "run")) == 2
    line = one_error_line(capsys)
    assert line.startswith(
        "hpcgan train: error: --device auto: torch is a CUDA 12.4 build but sees no GPU (CUDA_VISIBLE_DEVICES=(unset))"
    ), line
    assert "sbatch --gpus-per-task=1" in line and "--device cpu" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cuda_torch_with_device_cpu_runs_on_the_cpu(launch, gpu_node):
    """A login node with a CUDA torch: --device cpu is a choice, not a mistake."""
    launch()
    gpu_node(0)
    assert pick_device(0, "cpu") == torch.device("cpu")
    assert make_backend("none", device="cpu").device == torch.device("cpu")


def test_slurm_gpus_with_a_cpu_torch_are_refused(launch):
    """Slurm gave the job a GPU (SLURM_JOB_GPUS=0 is GPU number 0) but torch cannot use it."""
    launch(SLURM_JOB_ID=5, SLURM_JOB_GPUS=0)
    assert torch.version.cuda is None  # this machine's torch
    from hpcgan.errors import UsageError

    with pytest.raises(
        UsageError,
        match=r"^--device auto: Slurm allocated GPUs \(SLURM_JOB_GPUS=0\) but this "
        r"torch is built without CUDA: install a CUDA build of torch, or pass "
        r"--device cpu$",
    ):
        make_backend("none", device="auto")
    assert make_backend("none", device="cpu").device == torch.device("cpu")


def test_device_cuda_without_a_gpu_is_refused(launch, gpu_node):
    launch(CUDA_VISIBLE_DEVICES="")
    gpu_node(0)
    from hpcgan.errors import UsageError

    with pytest.raises(
        UsageError,
        match=r"^--device cuda: torch sees no CUDA device on this node "
        r"\(CUDA_VISIBLE_DEVICES=, torch CUDA build: 12.4\)$",
    ):
        pick_device(0, "cuda")


# --- ranks sharing a GPU ---------------------------------------------------------------------------
def test_two_local_ranks_on_one_visible_gpu_are_refused_before_the_rendezvous(
    cli_in_process, sample_dataset, tmp_path, capsys, launch, gpu_node
):
    """mpirun -np 2 on a node where both ranks see the same single GPU: NCCL would fail later with
    "Duplicate GPU"; rank 1 stops first with exit 2 and one line naming the counts."""
    launch(
        OMPI_COMM_WORLD_RANK=1,
        OMPI_COMM_WORLD_SIZE=2,
        OMPI_COMM_WORLD_LOCAL_RANK=1,
        OMPI_COMM_WORLD_LOCAL_SIZE=2,
        CUDA_VISIBLE_DEVICES=0,
    )
    chosen = gpu_node(1)
    assert cli_in_process(train_argv(sample_dataset, tmp_path / "run", "--backend", "torch")) == 2
    assert one_error_line(capsys) == (
        "hpcgan train: error: 2 ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE=2) but each sees 1 GPU(s) "
        '(CUDA_VISIBLE_DEVICES=0): ranks would share a GPU (NCCL "Duplicate GPU"); start at most 1 rank(s) '
        "per node, or give each its own (srun --gpus-per-task=1)"
    )
    assert chosen == []


SRUN_RANK_1_OF_2 = dict(
    SLURM_JOB_ID=9,
    SLURM_STEP_ID=0,
    SLURM_NTASKS=2,
    SLURM_PROCID=1,
    SLURM_LOCALID=1,
    SLURM_NODEID=0,
    SLURM_STEP_TASKS_PER_NODE=2,
    SLURM_STEP_GPUS=1,
    CUDA_VISIBLE_DEVICES=0,
)


def test_srun_gpus_per_task_gives_each_rank_its_own_gpu_and_is_not_refused(launch, gpu_node):
    """srun --gpus-per-task=1: each task sees exactly its own GPU, so local rank 1 takes cuda:0."""
    launch(**SRUN_RANK_1_OF_2, SLURM_GPUS_PER_TASK=1)
    chosen = gpu_node(1)
    assert pick_device(launch_env().local_rank, "auto") == torch.device("cuda", 0)
    assert chosen == [0]


@pytest.mark.parametrize("binding", [{"SLURM_GPU_BIND": "single:1"}, {"SLURM_GPUS_ON_NODE": 2}])
def test_srun_gpu_binding_is_not_refused(launch, gpu_node, binding):
    launch(**SRUN_RANK_1_OF_2, **binding)
    gpu_node(1)
    assert pick_device(1, "auto") == torch.device("cuda", 0)


def test_srun_with_fewer_gpus_than_tasks_on_the_node_is_refused(launch, gpu_node):
    """srun --ntasks-per-node=2 --gpus-per-node=1: both tasks see the one GPU of the step."""
    launch(**SRUN_RANK_1_OF_2, SLURM_GPUS_ON_NODE=1, SLURM_GPU_BIND="none")
    chosen = gpu_node(1)
    from hpcgan.errors import UsageError

    with pytest.raises(UsageError, match=r"^2 ranks on this node \(SLURM_STEP_TASKS_PER_NODE=2\) but each sees 1"):
        pick_device(1, "auto")
    assert chosen == []


def test_one_gpu_per_local_rank_is_not_refused(launch, gpu_node):
    launch(
        OMPI_COMM_WORLD_RANK=3,
        OMPI_COMM_WORLD_SIZE=4,
        OMPI_COMM_WORLD_LOCAL_RANK=1,
        OMPI_COMM_WORLD_LOCAL_SIZE=2,
        CUDA_VISIBLE_DEVICES="0,1",
    )
    chosen = gpu_node(2)
    assert pick_device(1, "auto") == torch.device("cuda", 1)
    assert chosen == [1]


def test_local_world_size_of_each_launcher():
    assert local_world_size({}) is None
    assert local_world_size({"MPI_LOCALNRANKS": "3"}) == (3, "MPI_LOCALNRANKS")
    # srun: the tasks of this node, from the step's layout ("2 on each of 2 nodes, then 1").
    srun = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}
    assert local_world_size({**srun, "SLURM_NODEID": "1"}) == (2, "SLURM_STEP_TASKS_PER_NODE")
    assert local_world_size({**srun, "SLURM_NODEID": "2"}) == (1, "SLURM_STEP_TASKS_PER_NODE")
    # torchrun under srun: the processes of this torchrun, not srun's tasks.
    torchrun = {
        **srun,
        "SLURM_NODEID": "0",
        "TORCHELASTIC_RUN_ID": "x",
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
    }
    assert local_world_size(torchrun) == (4, "LOCAL_WORLD_SIZE")


# --- torch threads from Slurm ----------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_torch_threads_follow_slurm_cpus_per_task(launch, restore_threads):
    torch.set_num_threads(1)
    launch(SLURM_JOB_ID=3, SLURM_CPUS_PER_TASK=3)
    make_backend("none", device="cpu")
    assert torch.get_num_threads() == 3


def test_omp_num_threads_wins_over_slurm_cpus_per_task(launch, restore_threads):
    torch.set_num_threads(1)
    launch(SLURM_JOB_ID=3, SLURM_CPUS_PER_TASK=3, OMP_NUM_THREADS=2)
    make_backend("none", device="cpu")
    assert torch.get_num_threads() == 1  # torch read OMP_NUM_THREADS at start; hpcgan leaves it


def test_torchrun_processes_share_the_cpus_of_their_srun_task():
    assert (
        slurm_threads(
            {
                "SLURM_CPUS_PER_TASK": "8",
                "TORCHELASTIC_RUN_ID": "x",
                "RANK": "0",
                "WORLD_SIZE": "4",
                "LOCAL_WORLD_SIZE": "4",
            }
        )
        == 2
    )
    assert slurm_threads({"SLURM_CPUS_PER_TASK": "8"}) == 8
    assert slurm_threads({}) is None


# --- torchrun under srun ---------------------------------------------------------------------------
TORCHRUN_UNDER_SRUN = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "PMI_RANK": "0",
    "PMI_SIZE": "1",
    "TORCHELASTIC_RUN_ID": "none",
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
}


def test_torchrun_under_srun_world_is_torchruns():
    """`srun --ntasks-per-node=1 torchrun --nproc-per-node=2` on 2 nodes: SLURM_NTASKS counts torchruns
    (and srun --mpi=pmi2 sets PMI_RANK for them); the world is WORLD_SIZE."""
    env = launch_env(TORCHRUN_UNDER_SRUN)
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    assert slurm_ntasks(TORCHRUN_UNDER_SRUN) is None
    plain_srun = {k: v for k, v in TORCHRUN_UNDER_SRUN.items() if k.startswith("SLURM_")}
    assert slurm_ntasks(plain_srun) == 1


def test_real_torchrun_in_an_srun_step_passes_the_world_check(tmp_path):
    """torchrun --nproc-per-node=2 with srun's variables for a one-task step: `hpcgan doctor --backend
    torch` sees a world of 2 and agrees with the launcher."""
    env = mpi_env({**{k: v for k, v in TORCHRUN_UNDER_SRUN.items() if k.startswith("SLURM_")}, "PYTHONPATH": str(REPO)})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = run_cmd([*torchrun, "-m", "hpcgan", "doctor", "--backend", "torch"], env=env, cwd=tmp_path, timeout=180)
    out = result.stdout.replace("\0", "")
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "world of 2, ranks report sizes [2, 2], allreduce sum 3 (expected 3)" in out, out


# --- slurm/pipeline.sh: cores per rank of the GPU jobs -------------------------------------------
STAND_IN_SBATCH = """#!/usr/bin/env bash
# Stands in for a GPU cluster's sbatch (the test Slurm has no GPUs): records the options, prints a job id.
echo "$*" >>"$SBATCH_CALLS"
wc -l <"$SBATCH_CALLS"
"""


def pipeline_submissions(tmp_path, **variables):
    """(exit code, stderr, {script: its sbatch options}) of slurm/pipeline.sh --no-preprocess."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(STAND_IN_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    calls = tmp_path / "sbatch-calls.txt"
    calls.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "HPCGAN_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SBATCH_CALLS=str(calls),
        HPCGAN_LOGS=str(tmp_path / "logs"),
        **{k: str(v) for k, v in variables.items()},
    )
    result = run_cmd(
        ["bash", str(REPO / "slurm" / "pipeline.sh"), "--no-preprocess"], env=env, cwd=tmp_path, timeout=60
    )
    jobs = {line.split()[-1].split("/")[-1]: line for line in calls.read_text().splitlines()}
    return result.returncode, result.stderr, jobs


def test_pipeline_gives_gpu_ranks_four_cores_by_default(tmp_path):
    code, err, jobs = pipeline_submissions(tmp_path, HPCGAN_GPUS_PER_NODE=4)
    assert code == 0, err
    for script in ("train.sbatch", "sample.sbatch", "evaluate.sbatch"):
        assert "--cpus-per-task=4" in jobs[script].split(), jobs[script]
    assert "--gpus-per-node=4" in jobs["train.sbatch"].split()
    # sample and evaluate (its segmentation task trains U-Nets) take one GPU each.
    assert all("--gpus-per-task=1" in jobs[s] for s in ("sample.sbatch", "evaluate.sbatch")), jobs


def test_pipeline_cores_per_rank_are_configurable(tmp_path):
    code, err, jobs = pipeline_submissions(tmp_path, HPCGAN_GPUS_PER_NODE=2, HPCGAN_CPUS_PER_TASK=12)
    assert code == 0, err
    assert "--cpus-per-task=12" in jobs["train.sbatch"].split() and "--cpus-per-task=12" in jobs["sample.sbatch"]
    # CPU nodes keep the scripts' #SBATCH line (one core per rank) unless told.
    code, err, jobs = pipeline_submissions(tmp_path)
    assert code == 0, err
    assert all("--cpus-per-task" not in options for options in jobs.values()), jobs
    code, err, _ = pipeline_submissions(tmp_path, HPCGAN_CPUS_PER_TASK="four")
    assert code == 2 and err.strip() == "hpcgan slurm: error: HPCGAN_CPUS_PER_TASK=four: expected a whole number >= 1"
