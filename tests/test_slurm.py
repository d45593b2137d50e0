"""slurm/*.sbatch and slurm/pipeline.sh on a real single-node Slurm cluster started for these tests.

The cluster (tests/slurm_cluster.py) is installed with apt-get when missing (root only), started
once for this module and always shut down. Jobs are polled with scontrol, each with a timeout, so
a stuck job fails its test instead of hanging CI. The dataset preprocessed by the pipeline test is
shared by the later tests; trainings use configs/wgan-gp-64.yaml with a few steps, 1 CPU per rank.
"""
import json
import os
import re
import shutil
from pathlib import Path

import pytest

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
    """What a user's login shell would hold: Open MPI's root permission (tests run as root) and HPCGAN_*."""
    env = mpi_env({"HPCGAN_ROOT": str(REPO), "HPCGAN_LOGS": str(work / "logs")})
    env.update({k: str(v) for k, v in hpcgan_vars.items()})
    return env


def submit_pipeline(cluster, work: Path, *args, **hpcgan_vars) -> dict:
    """Run slurm/pipeline.sh from `work` (the submit dir); {step: job id} from its output."""
    work.mkdir(parents=True, exist_ok=True)
    env = cluster.client_env(job_env(work, **hpcgan_vars))
    result = run_cmd(["bash", str(PIPELINE), *args], env=env, cwd=work, timeout=120, check=True)
    return dict(re.findall(r"^submitted (\w+): job (\d+)", result.stdout, re.M))


def sbatch(cluster, work: Path, script: str, *args, options=(), **hpcgan_vars) -> str:
    """Submit slurm/SCRIPT from `work` as a user would (sbatch OPTIONS slurm/SCRIPT ARGS); the job id."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(f"--output={work / 'logs' / '%x-%j.out'}", *options, REPO / "slurm" / script, *args,
                          env=job_env(work, **hpcgan_vars), cwd=work)


def logs_of(work: Path) -> str:
    """Every batch and per-rank log, for the failure message."""
    parts = [f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted((work / "logs").rglob("*"))
             if p.is_file()]
    return "\n".join(parts)


def wait_ok(cluster, job_id, work: Path, timeout):
    jobs = cluster.wait(job_id, timeout)
    bad = [(j["JobId"], j["JobState"], j["ExitCode"]) for j in jobs if j["JobState"] != "COMPLETED"]
    assert not bad, f"jobs not COMPLETED: {bad}\n{logs_of(work)}"
    return jobs


def test_failing_step_fails_its_job_and_cancels_the_dependants(cluster, tmp_path):
    """preprocess on a folder without NIfTI: hpcgan exits 2, so the job FAILED with 2, and train/sample/
    evaluate are cancelled without ever starting."""
    empty = tmp_path / "no-nifti-here"
    empty.mkdir()
    run = tmp_path / "runs" / "train"
    jobs = submit_pipeline(cluster, tmp_path, HPCGAN_INPUT=empty, HPCGAN_DATA=tmp_path / "dataset", HPCGAN_RUN=run,
                           HPCGAN_PREPROCESS_ARGS=PREPROCESS_ARGS)
    assert list(jobs) == ["preprocess", "train", "sample", "evaluate"]
    [pre] = cluster.wait(jobs["preprocess"], 120)
    assert (pre["JobState"], pre["ExitCode"]) == ("FAILED", "2:0"), logs_of(tmp_path)
    rank_logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("hpcgan-preprocess-*.rank*.log"))
    assert "hpcgan preprocess: error: --input" in rank_logs, logs_of(tmp_path)
    for step in ("train", "sample", "evaluate"):
        [job] = cluster.wait(jobs[step], 60)
        assert job["JobState"] == "CANCELLED" and job["Reason"] == "DependencyNeverSatisfied", job
        assert job["StartTime"] in ("Unknown", "None") or job["RunTime"] == "00:00:00", job
    assert not run.exists(), "a dependant job ran"


def test_preprocess_job_writes_shards_on_two_ranks(cluster, sample_data, tmp_path):
    """preprocess.sbatch: srun --mpi=pmix, 2 ranks, per-rank logs; the shards are the 1-process ones."""
    dataset = tmp_path / "dataset"
    job = sbatch(cluster, tmp_path, "preprocess.sbatch", *PREPROCESS_ARGS.split(), HPCGAN_INPUT=sample_data,
                 HPCGAN_DATA=dataset)
    [pre] = wait_ok(cluster, job, tmp_path, 180)
    assert pre["NumTasks"] == "2"
    rank_logs = sorted((tmp_path / "logs").glob(f"hpcgan-preprocess-{job}.step0.rank*.log"))
    assert [p.name.split(".")[-2] for p in rank_logs] == ["rank0", "rank1"]
    verify = run_cmd([HPCGAN, "info", "--verify", str(dataset)], env=mpi_env(), timeout=120)
    assert verify.returncode == 0, verify.stderr
    single = tmp_path / "single"
    run_cmd([HPCGAN, "preprocess", "--input", str(sample_data), "--output", str(single), *PREPROCESS_ARGS.split()],
            env=mpi_env(), timeout=180, check=True)
    assert shards_of(dataset) == shards_of(single)


def shards_of(dataset: Path) -> list:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return [(s["name"], s["slices"], s["sha256"]) for s in manifest["shards"]]
