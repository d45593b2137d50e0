"""slurm/*.sbatch and slurm/pipeline.sh on a real single-node Slurm cluster started for these tests.

The cluster (tests/slurm_cluster.py) is installed with apt-get when missing (root only), started
once for this module and always shut down. Jobs are polled with scontrol, each with a timeout, so
a stuck job fails its test instead of hanging CI. The dataset preprocessed by the pipeline test is
shared by the later tests; trainings use configs/wgan-gp-64.yaml with a few steps, 1 CPU per rank.
"""

import csv
import json
import os
import re
import shutil
import time
from pathlib import Path

import h5py
import pytest

from hpcgan.training.checkpointing import find_latest_valid, load_checkpoint

from conftest import REPO, mpi_env, run_cmd
from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_slurm_installed

pytestmark = [pytest.mark.slurm, pytest.mark.mpi, pytest.mark.slow]

PIPELINE = REPO / "slurm" / "pipeline.sh"
HPCGAN = str(REPO / ".venv" / "bin" / "hpcgan")
PREPROCESS_ARGS = "--modalities t1 --size 64 --slices 80:100 --shards 2"


@pytest.fixture(scope="module")
def cluster():
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def job_env(work: Path, **hpcgan_vars) -> dict:
    """What a user's login shell would hold: Open MPI's root permission (tests run as root) and HPCGAN_*.
    No HPCGAN_ROOT: the scripts find the checkout from the submitted script's path."""
    env = mpi_env({"HPCGAN_LOGS": str(work / "logs")})
    env.pop("HPCGAN_ROOT", None)
    env.update({k: str(v) for k, v in hpcgan_vars.items()})
    return env


def submit_pipeline(cluster, work: Path, *args, **hpcgan_vars) -> dict:
    """Run slurm/pipeline.sh from `work` (the submit dir); {step: job id} from its output."""
    work.mkdir(parents=True, exist_ok=True)
    env = cluster.client_env(job_env(work, **hpcgan_vars))
    result = run_cmd(cluster.client_cmd(["bash", PIPELINE, *args]), env=env, cwd=work, timeout=120, check=True)
    return dict(re.findall(r"^submitted (\w+): job (\d+)", result.stdout, re.M))


def sbatch(cluster, work: Path, script: str, *args, options=(), **hpcgan_vars) -> str:
    """Submit slurm/SCRIPT from `work` as a user would (sbatch OPTIONS slurm/SCRIPT ARGS); the job id."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(
        f"--output={work / 'logs' / '%x-%j.out'}",
        *options,
        REPO / "slurm" / script,
        *args,
        env=job_env(work, **hpcgan_vars),
        cwd=work,
    )


def logs_of(work: Path) -> str:
    """Every batch and per-rank log, for the failure message."""
    parts = [
        f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}"
        for p in sorted((work / "logs").rglob("*"))
        if p.is_file()
    ]
    return "\n".join(parts)


def wait_ok(cluster, job_id, work: Path, timeout):
    jobs = cluster.wait(job_id, timeout)
    bad = [(j["JobId"], j["JobState"], j["ExitCode"]) for j in jobs if j["JobState"] != "COMPLETED"]
    assert not bad, f"jobs not COMPLETED: {bad}\n{logs_of(work)}"
    return jobs


STAND_IN_APPTAINER = REPO / "tests" / "scripts" / "apptainer-stand-in.sh"


def test_container_mode_runs_each_step_through_apptainer_with_its_dirs_bound(cluster, sample_data, tmp_path):
    """HPCGAN_CONTAINER=IMAGE: the step runs `apptainer exec --nv --bind DIRS IMAGE hpcgan ...` on every
    rank, and every path hpcgan is given lies in a bound directory (the hybrid model's srun launches it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(STAND_IN_APPTAINER.read_text())
    (bin_dir / "apptainer").chmod(0o755)
    image = tmp_path / "hpcgan.sif"
    image.write_bytes(b"")
    dataset = tmp_path / "dataset"
    job = sbatch(
        cluster,
        tmp_path,
        "preprocess.sbatch",
        *PREPROCESS_ARGS.split(),
        HPCGAN_INPUT=sample_data,
        HPCGAN_DATA=dataset,
        HPCGAN_CONTAINER=image,
        HPCGAN_TEST_VENV=REPO / ".venv",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    wait_ok(cluster, job, tmp_path, 180)
    assert (dataset / "manifest.json").exists()
    calls = (bin_dir / "calls.log").read_text().splitlines()
    assert len(calls) == 2, calls  # one container per rank
    words = calls[0].split()
    assert words[:3] == ["exec", "--nv", "--bind"] and words[4:7] == [str(image), "hpcgan", "preprocess"], words
    binds = words[3].split(",")
    paths = [w for w in words[7:] if w.startswith("/")]
    assert paths and all(any(p == b or p.startswith(b + "/") for b in binds) for p in paths), (paths, binds)


def test_failing_step_fails_its_job_and_cancels_the_dependants(cluster, tmp_path):
    """preprocess on a folder without NIfTI: hpcgan exits 2, so the job FAILED with 2, and train/sample/
    evaluate are cancelled without ever starting."""
    empty = tmp_path / "no-nifti-here"
    empty.mkdir()
    run = tmp_path / "runs" / "train"
    jobs = submit_pipeline(
        cluster,
        tmp_path,
        HPCGAN_INPUT=empty,
        HPCGAN_DATA=tmp_path / "dataset",
        HPCGAN_RUN=run,
        HPCGAN_PREPROCESS_ARGS=PREPROCESS_ARGS,
    )
    assert list(jobs) == ["preprocess", "train", "sample", "evaluate"]
    [pre] = cluster.wait(jobs["preprocess"], 120)
    assert (pre["JobState"], pre["ExitCode"]) == ("FAILED", "2:0"), logs_of(tmp_path)
    rank_logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("hpcgan-preprocess-*.rank*.log"))
    assert "hpcgan preprocess: error: --input" in rank_logs, logs_of(tmp_path)
    batch_log = (tmp_path / "logs" / f"hpcgan-preprocess-{jobs['preprocess']}.out").read_text()
    assert "exited with code 2" in batch_log and "hpcgan preprocess: error: --input" in batch_log, batch_log
    for step in ("train", "sample", "evaluate"):
        [job] = cluster.wait(jobs[step], 60)
        assert job["JobState"] == "CANCELLED" and job["Reason"] == "DependencyNeverSatisfied", job
        assert job["StartTime"] in ("Unknown", "None") or job["RunTime"] == "00:00:00", job
    assert not run.exists(), "a dependant job ran"


def shards_of(dataset: Path) -> list:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return [(s["name"], s["slices"], s["sha256"]) for s in manifest["shards"]]


# --- the pipeline end to end; its dataset is shared by the tests after it ---------------------------

TRAIN_ARGS = "--set train.steps=20 --set train.batch_size=4 --set checkpoint.every_steps=10"


@pytest.fixture(scope="module")
def pipeline(cluster, sample_data, tmp_path_factory):
    """slurm/pipeline.sh with its default paths: the MRI is linked in as data/raw, outputs go to
    data/dataset and runs/train under the submit dir. Submitted once; tests wait for what they need."""
    work = tmp_path_factory.mktemp("pipeline")
    (work / "data").mkdir()
    (work / "data" / "raw").symlink_to(sample_data)
    jobs = submit_pipeline(
        cluster,
        work,
        HPCGAN_PREPROCESS_ARGS=PREPROCESS_ARGS,
        HPCGAN_TRAIN_ARGS=TRAIN_ARGS,
        HPCGAN_SAMPLE_ARGS="--num-stacks 1 --stack-size 8 --seed 3",
    )
    return work, jobs


@pytest.fixture(scope="module")
def dataset(cluster, pipeline) -> Path:
    """The pipeline's preprocessed dataset, shared by the tests after it."""
    work, jobs = pipeline
    wait_ok(cluster, jobs["preprocess"], work, 180)
    return work / "data" / "dataset"


def test_preprocess_job_writes_shards_on_two_ranks(cluster, pipeline, dataset, sample_data, tmp_path):
    """preprocess.sbatch: srun --mpi=pmix, 2 ranks, per-rank logs; the shards are the 1-process ones."""
    work, jobs = pipeline
    [pre] = cluster.jobs(jobs["preprocess"])
    assert pre["NumTasks"] == "2"
    rank_logs = sorted((work / "logs").glob(f"hpcgan-preprocess-{jobs['preprocess']}.step0.rank*.log"))
    assert [p.name.split(".")[-2] for p in rank_logs] == ["rank0", "rank1"]
    verify = run_cmd([HPCGAN, "info", "--verify", str(dataset)], env=mpi_env(), timeout=120)
    assert verify.returncode == 0, verify.stderr
    single = tmp_path / "single"
    run_cmd(
        [HPCGAN, "preprocess", "--input", str(sample_data), "--output", str(single), *PREPROCESS_ARGS.split()],
        env=mpi_env(),
        timeout=180,
        check=True,
    )
    assert shards_of(dataset) == shards_of(single)


def test_pipeline_runs_to_the_end(cluster, pipeline, dataset):
    work, jobs = pipeline
    for step in ("train", "sample", "evaluate"):
        wait_ok(cluster, jobs[step], work, 240)
    assert list(jobs) == ["preprocess", "train", "sample", "evaluate"]
    [train] = cluster.jobs(jobs["train"])
    assert train["Dependency"] in ("(null)", "") and train["NumTasks"] == "2"  # afterok, satisfied
    assert len(list(dataset.glob("*.h5"))) == 2
    run = work / "runs" / "train"
    state = load_checkpoint(find_latest_valid(run / "checkpoints"))
    assert (state["step"], state["world_size"]) == (20, 2)
    index = json.loads((run / "samples" / "index.json").read_text())
    assert index["step"] == 20
    stack = next((run / "samples").glob("stack-*.h5"))
    with h5py.File(stack) as f:
        assert f["images"].shape == (8, 1, 64, 64)
    report = json.loads((run / "evaluation.json").read_text())
    # The evaluate step scored every image the sample step wrote, from this run's last checkpoint.
    assert report["generated"]["checkpoint_sha256"] == index["checkpoint_sha256"]
    assert (
        report["generated"]["count"]
        == index["num_stacks"] * index["stack_size"]
        == 8 * len(list((run / "samples").glob("stack-*.h5")))
    )
    rank_logs = sorted((work / "logs").glob(f"hpcgan-train-{jobs['train']}.step0.rank*.log"))
    assert len(rank_logs) == 2


def test_usr1_checkpoints_requeues_and_resumes(cluster, dataset, tmp_path):
    """scancel --signal=USR1 --batch (what Slurm does 120 s before the time limit): the script forwards
    it, every rank checkpoints and exits 75, the job requeues itself and the same job resumes."""
    run = tmp_path / "run"
    steps = 16
    job = sbatch(
        cluster,
        tmp_path,
        "train.sbatch",
        "--set",
        f"train.steps={steps}",
        "--set",
        "train.batch_size=4",
        "--set",
        "checkpoint.every_steps=4",
        HPCGAN_DATA=dataset,
        HPCGAN_RUN=run,
    )
    deadline = time.monotonic() + 120
    while not any((run / "checkpoints").glob("ckpt-*.pt")):  # training is under way
        [info] = cluster.jobs(job)
        assert info["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, (info, logs_of(tmp_path))
        time.sleep(0.5)
    cluster.signal_batch(job, "USR1")
    [info] = cluster.wait(job, 90, until={"PENDING", "COMPLETED", "FAILED"})
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), (info["ExitCode"], logs_of(tmp_path))
    cluster.release_requeued(job)  # instead of Slurm's ~2 minute hold
    [info] = wait_ok(cluster, job, tmp_path, 180)
    assert info["Restarts"] == "1"
    batch_log = (tmp_path / "logs" / f"hpcgan-train-{job}.out").read_text()
    assert "got SIGUSR1" in batch_log and "requeueing job" in batch_log, batch_log
    rank0 = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob(f"hpcgan-train-{job}.step0.rank0.log")))
    resumed = re.findall(r"resuming from ckpt-\d+\.pt \(step (\d+)\)", rank0)
    assert len(resumed) == 1 and 4 <= int(resumed[0]) < steps, rank0
    state = load_checkpoint(find_latest_valid(run / "checkpoints"))
    assert state["step"] == steps


def test_sweep_array_trains_each_grid_point_and_summarises(cluster, dataset, tmp_path):
    """pipeline.sh --sweep: a 2-element job array (launched with mpirun inside the allocation, the
    alternative launcher) gives two runs with their evaluations, then a summary job a CSV of both."""
    grid = "optim.lr=1e-4,2e-4"
    sweep_dir = tmp_path / "sweep"
    jobs = submit_pipeline(
        cluster,
        tmp_path,
        "--no-preprocess",
        "--sweep",
        grid,
        HPCGAN_DATA=dataset,
        HPCGAN_SWEEP_DIR=sweep_dir,
        HPCGAN_TRAIN_ARGS=TRAIN_ARGS,
        HPCGAN_LAUNCHER="mpirun",
        HPCGAN_SAMPLE_ARGS="--num-stacks 1 --stack-size 8",
    )
    assert list(jobs) == ["sweep", "summary"]
    elements = wait_ok(cluster, jobs["sweep"], tmp_path, 300)
    assert sorted(j["ArrayTaskId"] for j in elements) == ["0", "1"]
    for element in elements:  # Open MPI's per-rank output of the 2-rank training
        assert (tmp_path / "logs" / f"hpcgan-sweep-{element['JobId']}.train.run0" / "1" / "rank.1").is_dir()
    wait_ok(cluster, jobs["summary"], tmp_path, 120)
    names = [
        run_cmd(
            [HPCGAN, "sweep", "--grid", grid, "--index", str(i), "--name"], env=mpi_env(), check=True
        ).stdout.strip()
        for i in range(2)
    ]
    lrs = []
    for name in names:
        state = load_checkpoint(find_latest_valid(sweep_dir / name / "checkpoints"))
        assert state["step"] == 20
        lrs.append(state["config"]["optim"]["lr"])
        assert (sweep_dir / name / "evaluation.json").exists()
    assert sorted(lrs) == [1e-4, 2e-4]
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(names) and [r["rank"] for r in rows] == ["1", "2"]
    for row in rows:  # each run's own evaluation.json, to the CSV's 6 significant digits
        evaluation = json.loads((sweep_dir / row["run"] / "evaluation.json").read_text())
        assert row["step"] == "evaluation.json", row
        assert float(row["swd"]) == pytest.approx(evaluation["metrics"]["swd"]["value"], rel=1e-5), row
