"""hpcgan across nodes, for real: a 2-node Slurm cluster in network namespaces on this machine
(tests/slurm_cluster.py MultiNodeSlurmCluster: a "hub" namespace with the bridge and slurmctld,
node1 and node2 each with their own hostname, address and slurmd), started once for this module
and always torn down.

What crosses the node boundary goes over the veth links: the tests count the bytes there. The
namespaces share the file system (as a cluster's shared file system) and /dev/shm, so the traffic
test forces Open MPI's TCP transport (OMPI_MCA_btl=tcp,self) to say exactly which one it measured;
between ranks on different nodes Open MPI never picks its shared-memory BTL anyway, because PMIx
reports them on different hosts (the default-transport case checks that too).
"""

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from hpcgan.training.checkpointing import find_latest_valid, load_checkpoint, read_index

from conftest import REPO, hpcgan_cmd, mpi_env, run_cmd, run_hpcgan
from slurm_cluster import MultiNodeSlurmCluster, SlurmUnavailable, ensure_slurm_installed
from test_slurm import PIPELINE, PREPROCESS_ARGS, job_env, logs_of, sbatch, submit_pipeline, wait_ok
from test_stylegan2_training import STYLE_TOLERANCE, style_args
from test_train import PURE, assert_two_ranks_trained_like_one, train_args

pytestmark = [pytest.mark.slurm, pytest.mark.mpi, pytest.mark.slow]

ALLREDUCE = REPO / "tests" / "mpi_scripts" / "cross_node_allreduce.py"
TRAIN_STEPS = 4
TRAIN_ARGS = f"--set train.steps={TRAIN_STEPS} --set train.batch_size=4 --set checkpoint.every_steps=2"
SAMPLE_ARGS = "--num-stacks 1 --stack-size 8 --seed 3"


@pytest.fixture(scope="module")
def cluster(report_figure):
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    cluster = MultiNodeSlurmCluster(nodes=2, cpus_per_node=2)
    started = time.monotonic()
    try:
        try:
            cluster.start()
        except SlurmUnavailable as exc:  # not root, or no network namespaces here
            pytest.skip(str(exc))
        report_figure(f"2-node Slurm cluster in network namespaces: idle {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
    assert not any(ns in run_cmd(["ip", "netns", "list"]).stdout for ns in cluster.node_ns.values())


def srun(cluster, *cmd, env=None, timeout=120):
    """`srun --mpi=pmix CMD` from the hub (the cluster's login node); its CompletedProcess."""
    return run_cmd(
        cluster.client_cmd(["srun", "--mpi=pmix", *cmd]), env=cluster.client_env(mpi_env(env)), timeout=timeout
    )


@pytest.mark.parametrize("btl", ["tcp,self", None], ids=["btl=tcp", "default-btl"])
def test_allreduce_between_nodes_goes_over_their_link(cluster, btl, report_figure):
    """16 MiB summed across node1 and node2: the right sum on both, and at least 16 MiB counted on
    node1's veth link. Were the ranks sharing memory, the link would see only Slurm's few kB."""
    before = cluster.link_bytes("node1")
    result = srun(cluster, "-N2", "-n2", sys.executable, ALLREDUCE, 16, env={"OMPI_MCA_btl": btl} if btl else None)
    moved = cluster.link_bytes("node1") - before
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hosts"] == ["node1", "node2"] and report["correct"], report
    report_figure(
        f"btl={btl or 'default'}: 16 MiB allreduce node1<->node2 in {report['seconds'] * 1e3:.1f} ms "
        f"(8 B: {report['small_seconds'] * 1e6:.0f} us); node1's link carried {moved / 1e6:.1f} MB"
    )
    assert moved >= report["bytes"], (moved, report)


def test_doctor_names_both_hosts_of_a_cross_node_allreduce(cluster):
    result = srun(cluster, "-N2", "-n2", *hpcgan_cmd("doctor"))
    assert result.returncode == 0, result.stdout + result.stderr
    world = next(line for line in result.stdout.splitlines() if " world " in line)
    assert (
        world.startswith("ok")
        and "allreduce sum 3 (expected 3) across 2 host(s) (node1: ranks 0; node2: ranks 1)" in world
        and "SLURM_NTASKS=2" in world
    ), result.stdout


# --- the pipeline across nodes; the first run's dataset is shared by the tests after it ------------------


@pytest.fixture(scope="module")
def horovod_pipeline(cluster, sample_data, tmp_path_factory):
    """slurm/pipeline.sh with HPCGAN_NODES=2 and one task per node (Horovod): every step to COMPLETED."""
    work = tmp_path_factory.mktemp("pipeline-2x1")
    jobs = submit_pipeline(
        cluster,
        work,
        HPCGAN_NODES=2,
        HPCGAN_TASKS_PER_NODE=1,
        HPCGAN_INPUT=sample_data,
        HPCGAN_PREPROCESS_ARGS=PREPROCESS_ARGS,
        HPCGAN_TRAIN_ARGS=TRAIN_ARGS,
        HPCGAN_SAMPLE_ARGS=SAMPLE_ARGS,
    )
    for step in ("preprocess", "train", "sample", "evaluate"):
        wait_ok(cluster, jobs[step], work, 300)
    return work, jobs


def assert_pipeline_ran(cluster, work: Path, jobs: dict, world_size: int):
    for step in ("train", "preprocess"):
        if step in jobs:
            [job] = cluster.jobs(jobs[step])
            assert (job["NumNodes"], job["NodeList"], job["NumTasks"]) == ("2", "node[1-2]", str(world_size)), job
    run = work / "runs" / "train"
    state = load_checkpoint(find_latest_valid(run / "checkpoints"))
    # The coordinator compared every rank's weight digest at each checkpoint: the replicas agreed.
    assert (state["step"], state["world_size"]) == (TRAIN_STEPS, world_size) and state["replica_digest"]
    assert json.loads((run / "samples" / "index.json").read_text())["step"] == TRAIN_STEPS
    assert json.loads((run / "evaluation.json").read_text())["metrics"]["swd"]["value"] >= 0, logs_of(work)


def test_pipeline_on_two_nodes_one_task_each_horovod(cluster, horovod_pipeline):
    work, jobs = horovod_pipeline
    assert list(jobs) == ["preprocess", "train", "sample", "evaluate"]
    assert_pipeline_ran(cluster, work, jobs, world_size=2)


def test_pipeline_on_two_nodes_two_tasks_each_torch(cluster, horovod_pipeline, tmp_path):
    dataset = horovod_pipeline[0] / "data" / "dataset"
    jobs = submit_pipeline(
        cluster,
        tmp_path,
        "--no-preprocess",
        HPCGAN_NODES=2,
        HPCGAN_TASKS_PER_NODE=2,
        HPCGAN_DATA=dataset,
        HPCGAN_TRAIN_ARGS=f"{TRAIN_ARGS} --backend torch",
        HPCGAN_SAMPLE_ARGS=SAMPLE_ARGS,
    )
    for step in ("train", "sample", "evaluate"):
        wait_ok(cluster, jobs[step], tmp_path, 300)
    assert_pipeline_ran(cluster, tmp_path, jobs, world_size=4)
    rank_logs = sorted((tmp_path / "logs").glob(f"hpcgan-train-{jobs['train']}.step0.rank*.log"))
    assert len(rank_logs) == 4


# A model without batch norm and the hinge loss (no random mixing): a step is a pure function of the batch.
PURE_TRAINING = [*PURE, "loss.type=hinge", "train.ema_decay=0"]


@pytest.fixture(scope="module")
def one_process_run(horovod_pipeline, tmp_path_factory) -> Path:
    """4 steps of one process with batch 8 on the pipeline's dataset (outside Slurm)."""
    run = tmp_path_factory.mktemp("one-process") / "run"
    run_hpcgan(
        *train_args(horovod_pipeline[0] / "data" / "dataset", run, 4, *PURE_TRAINING, "train.batch_size=8"),
        check=True,
        timeout=240,
    )
    return run


@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_nodes_equal_one_process_with_twice_the_batch(
    cluster, horovod_pipeline, one_process_run, tmp_path, backend
):
    """node1 and node2 with batch 4 each give the weights and optimizer state of one process with
    batch 8, to float tolerance."""
    dataset = horovod_pipeline[0] / "data" / "dataset"
    train = train_args(dataset, tmp_path / "two", 4, *PURE_TRAINING, "train.batch_size=4")
    two_nodes = srun(cluster, "-N2", "-n2", *hpcgan_cmd(*train, "--backend", backend), timeout=240)
    assert two_nodes.returncode == 0, two_nodes.stderr[-3000:]
    assert_two_ranks_trained_like_one(one_process_run, tmp_path / "two")


def test_two_nodes_train_stylegan2_like_one_process_with_twice_the_batch(cluster, horovod_pipeline, tmp_path):
    """StyleGAN2 across node1 and node2 (Horovod), lazy R1 and path-length steps included, gives the weights and
    optimizer state of one process with batch 8."""
    dataset = horovod_pipeline[0] / "data" / "dataset"
    one = tmp_path / "one"
    run_hpcgan(*style_args(dataset, one, 4, "train.batch_size=8"), check=True, timeout=240)
    two_nodes = srun(cluster, "-N2", "-n2", *hpcgan_cmd(*style_args(dataset, tmp_path / "two", 4)), timeout=240)
    assert two_nodes.returncode == 0, two_nodes.stderr[-3000:]
    assert_two_ranks_trained_like_one(one, tmp_path / "two", **STYLE_TOLERANCE)


# --- bad input: one line, exit 2 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "variables, needle",
    [
        (
            {"HPCGAN_NODES": 3, "HPCGAN_TASKS_PER_NODE": 1},
            "sbatch refused the preprocess job (HPCGAN_NODES=3): Batch "
            "job submission failed: Node count specification invalid",
        ),
        (
            {"HPCGAN_NODES": 2, "HPCGAN_NODELIST": "node1,node9"},
            "sbatch refused the preprocess job (HPCGAN_NODES=2 "
            "HPCGAN_NODELIST=node1,node9): Batch job submission failed: "
            "Invalid node name specified",
        ),
        ({"HPCGAN_NODES": "two"}, "HPCGAN_NODES=two: expected a whole number >= 1"),
    ],
)
def test_pipeline_refuses_nodes_the_cluster_does_not_have(cluster, tmp_path, variables, needle):
    env = cluster.client_env(job_env(tmp_path, **variables))
    result = run_cmd(cluster.client_cmd(["bash", PIPELINE]), env=env, cwd=tmp_path, timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr == f"hpcgan slurm: error: {needle}\n"


def test_train_job_with_fewer_nodes_than_hpcgan_nodes_fails_with_one_line(cluster, tmp_path):
    """HPCGAN_NODES=2 in the environment of a one-node train.sbatch (its #SBATCH --nodes=1): the job
    stops before starting any rank instead of silently training on one node."""
    job = sbatch(cluster, tmp_path, "train.sbatch", HPCGAN_NODES=2, HPCGAN_RUN=tmp_path / "run")
    [info] = cluster.wait(job, 60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), logs_of(tmp_path)
    log = (tmp_path / "logs" / f"hpcgan-train-{job}.out").read_text()
    assert re.search(
        rf"^hpcgan slurm: error: HPCGAN_NODES=2 but job {job} has 1 node\(s\) \(node[12]\): submit it "
        r"with sbatch --nodes=2 \(slurm/pipeline.sh does\)$",
        log,
        re.M,
    ), log
    assert not (tmp_path / "run").exists()


# --- faults across nodes ---------------------------------------------------------------------------------


def lost_nodes_seen_from_node1(cluster, work: Path):
    """slurm/common.sh's hpcgan_lost_nodes as the batch script of a 2-node job (1 rank per node) on
    node1 runs it after a failed step."""
    job = {
        "SLURM_JOB_ID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "HPCGAN_ROOT": str(REPO),
        "HPCGAN_LOGS": str(work / "logs"),
    }
    script = 'source "$HPCGAN_ROOT/slurm/common.sh" && hpcgan_lost_nodes'
    return run_cmd(
        cluster.in_namespace(cluster.node_ns["node1"], "node1", ["bash", "-c", script]),
        env=dict(cluster.env, **job),
        timeout=30,
    )


FAULT_TRAIN_ARGS = ["--set", "train.batch_size=4", "--set", "checkpoint.every_steps=2", "--set", "log.every_steps=1"]


def train_on_two_nodes(cluster, work: Path, dataset: Path, steps: int, *options, train_args=()) -> str:
    """train.sbatch on node1 and node2 (one Horovod rank each) into WORK/run, with sbatch OPTIONS and
    hpcgan's TRAIN_ARGS; its job id, once the first checkpoint shows that training is under way on both nodes."""
    run = work / "run"
    job = sbatch(
        cluster,
        work,
        "train.sbatch",
        "--set",
        f"train.steps={steps}",
        *FAULT_TRAIN_ARGS,
        *train_args,
        HPCGAN_NODES=2,
        options=("--nodes=2", "--ntasks-per-node=1", *options),
        HPCGAN_DATA=dataset,
        HPCGAN_RUN=run,
    )
    deadline = time.monotonic() + 180
    while not any((run / "checkpoints").glob("ckpt-*.pt")):
        [info] = cluster.jobs(job)
        assert info["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, (info, logs_of(work))
        time.sleep(0.5)
    return job


def last_logged_step(run: Path) -> int:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def fault_during_training(cluster, work: Path, dataset: Path, fault, train_args=()) -> tuple[dict, int, float, float]:
    """fault() a second after the first checkpoint of a 2-node training job (--no-requeue: Slurm would
    otherwise requeue it onto the two nodes once the lost one is declared down). The job's final
    record, the last step logged at the fault, the seconds from the fault to the job's end, and the
    time of the fault (time.monotonic())."""
    job = train_on_two_nodes(cluster, work, dataset, 1000, "--no-requeue", train_args=train_args)
    time.sleep(1)
    fault_at = time.monotonic()
    fault()
    steps_done = last_logged_step(work / "run")
    [info] = cluster.wait(job, 120)
    return info, steps_done, time.monotonic() - fault_at, fault_at


def test_node_dies_mid_training_job_ends_and_resumes_on_the_survivor(
    cluster, horovod_pipeline, tmp_path, report_figure
):
    """Every process of node2 (slurmd, slurmstepd, its rank) killed during a 2-node Horovod training: the
    job ends within 60 s, not COMPLETED, its log naming node2; the same script on node1 alone
    (--resume auto, a world of 1) continues from the newest checkpoint, whose index is intact.

    Rank 0 learns of the loss at once (Open MPI: "peer hangup ... Peer host: node2") but stays blocked
    in MPI; Slurm ends the job (NODE_FAIL, "Node failure on node2") when slurmctld declares node2 down,
    after SlurmdTimeout (20 s on this cluster). Should rank 0 exit first (Gloo raises "Connection reset
    by peer"), the job FAILS and the batch script names the node that no longer answers and its ranks."""
    dataset = horovod_pipeline[0] / "data" / "dataset"
    run = tmp_path / "run"

    def kill_node2():
        assert cluster.kill_node("node2") >= 2  # slurmd, slurmstepd and the rank at least

    try:
        info, steps_done, time_to_exit, _ = fault_during_training(cluster, tmp_path, dataset, kill_node2)
        lost = lost_nodes_seen_from_node1(cluster, tmp_path)
    finally:
        cluster.start_node("node2")  # back for the other tests: ReturnToService=2 makes it idle again
    log = (tmp_path / "logs" / f"hpcgan-train-{info['JobId']}.out").read_text()
    assert time_to_exit < 60, log
    lost_message = "hpcgan slurm: error: node node2 (rank 1) does not answer: it was lost"
    expected_line = {"NODE_FAIL": "srun: error: Node failure on node2", "FAILED": lost_message}
    assert expected_line.get(info["JobState"], "not a failure state") in log, (info, log)
    assert lost.returncode == 0 and lost.stderr.startswith(lost_message) and "node1" not in lost.stderr, lost
    saved = load_checkpoint(find_latest_valid(run / "checkpoints"))
    assert saved["world_size"] == 2
    report_figure(
        f"node2 killed at step {steps_done}: job {info['JobState']} ({info['ExitCode']}) {time_to_exit:.1f} s "
        f"later; newest checkpoint: step {saved['step']} ({steps_done - saved['step']} step(s) lost)"
    )

    resumed = sbatch(
        cluster,
        tmp_path,
        "train.sbatch",
        "--set",
        f"train.steps={saved['step'] + 2}",
        *FAULT_TRAIN_ARGS,
        HPCGAN_NODES=1,
        options=("--nodes=1", "--ntasks-per-node=1", "--nodelist=node1"),
        HPCGAN_DATA=dataset,
        HPCGAN_RUN=run,
    )
    wait_ok(cluster, resumed, tmp_path, 180)
    rank0 = (tmp_path / "logs" / f"hpcgan-train-{resumed}.step0.rank0.log").read_text()
    assert f"resuming from ckpt-{saved['step']:08d}.pt (step {saved['step']})" in rank0, rank0
    newest = find_latest_valid(run / "checkpoints")
    assert [e["file"] for e in read_index(run / "checkpoints")][-1] == newest.name  # index and files agree
    final = load_checkpoint(newest)
    assert (final["step"], final["world_size"]) == (saved["step"] + 2, 1)


def test_usr1_to_a_two_node_job_checkpoints_requeues_and_resumes_on_both_nodes(
    cluster, horovod_pipeline, tmp_path, report_figure
):
    """scancel --signal=USR1 --batch to a 2-node train.sbatch job, as tests/cluster/test_slurm.py does on one
    node: the batch script (on node1) forwards it through srun to the ranks on node1 and node2, which
    checkpoint at the next step and exit 75; the job requeues itself and the same job runs again on
    both nodes, from that checkpoint (no step lost), to the end."""
    dataset = horovod_pipeline[0] / "data" / "dataset"
    run = tmp_path / "run"
    steps = 60  # still running when the signal comes (a step takes 0.1-0.3 s here)
    job = train_on_two_nodes(cluster, tmp_path, dataset, steps)
    signalled_at = time.monotonic()
    cluster.signal_batch(job, "USR1")
    [info] = cluster.wait(job, 90, until={"PENDING", "COMPLETED", "FAILED"})
    time_to_requeue = time.monotonic() - signalled_at
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), (info["ExitCode"], logs_of(tmp_path))
    steps_done = last_logged_step(run)
    checkpointed = load_checkpoint(find_latest_valid(run / "checkpoints"))
    assert (checkpointed["step"], checkpointed["world_size"]) == (steps_done, 2), logs_of(tmp_path)
    assert steps_done < steps
    cluster.release_requeued(job)  # instead of Slurm's ~2 minute hold
    [info] = wait_ok(cluster, job, tmp_path, 180)
    assert (info["Restarts"], info["NumNodes"], info["NodeList"]) == ("1", "2", "node[1-2]"), info
    batch_log = (tmp_path / "logs" / f"hpcgan-train-{job}.out").read_text()
    assert "got SIGUSR1" in batch_log and "requeueing job" in batch_log, batch_log
    rank0 = (tmp_path / "logs" / f"hpcgan-train-{job}.step0.rank0.log").read_text()
    assert re.findall(r"resuming from ckpt-\d+\.pt \(step (\d+)\)", rank0) == [str(steps_done)], rank0
    final = load_checkpoint(find_latest_valid(run / "checkpoints"))
    assert (final["step"], final["world_size"]) == (steps, 2)
    report_figure(
        f"USR1 to the 2-node job at step {steps_done}: checkpointed, exit 75 and requeued "
        f"{time_to_requeue:.1f} s later; resumed on node[1-2] from step {steps_done} (0 steps lost)"
    )


def rank_processes(cluster, node: str) -> list[str]:
    """The hpcgan processes (not slurmd/slurmstepd) that still run in NODE's namespace, as 'PID ARGS'."""
    left = []
    for pid in cluster.namespace_pids(cluster.node_ns[node]):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if "hpcgan" in args and "slurm" not in args.split(" ", 1)[0]:
            left.append(f"{pid} {args.strip()}")
    return left


PARTITION_WATCHDOG_S = 60  # above the 39-48 s Slurm takes to end the job on node1's side


def test_network_partition_ends_the_job_and_the_cut_off_rank_by_its_watchdog(
    cluster, horovod_pipeline, tmp_path, report_figure
):
    """node2's link taken down during a 2-node Horovod training with train.watchdog_s=60 (its processes keep
    running, cut off from node1 and slurmctld): rank 0 waits in its allreduce, no connection is reset;
    slurmctld declares node2 down after SlurmdTimeout (20 s here) and ends the job (NODE_FAIL, "Node failure
    on node2") within 60 s. The cut-off rank on node2 hears of none of it: its watchdog ends it within
    train.watchdog_s (+ margin) of the cut, with its one line in its rank log (without the watchdog it ran
    on until Horovod's stall shutdown, 30 minutes; Slurm does not end it, not even once the link is back)."""
    dataset = horovod_pipeline[0] / "data" / "dataset"
    run = tmp_path / "run"
    watchdog = ("--set", f"train.watchdog_s={PARTITION_WATCHDOG_S}")
    try:
        info, steps_done, time_to_exit, cut_at = fault_during_training(
            cluster, tmp_path, dataset, lambda: cluster.cut_link("node2"), train_args=watchdog
        )
        while rank_processes(cluster, "node2") and time.monotonic() < cut_at + PARTITION_WATCHDOG_S + 30:
            time.sleep(0.5)
        orphan_exit = time.monotonic() - cut_at
        orphans = rank_processes(cluster, "node2")
    finally:
        cluster.restore_link("node2")
        # node2's slurmd (and slurmstepd) lost the controller: start node2 as new, as after a reboot.
        cluster.kill_node("node2")
        cluster.start_node("node2")
    log = (tmp_path / "logs" / f"hpcgan-train-{info['JobId']}.out").read_text()
    assert info["JobState"] == "NODE_FAIL" and "srun: error: Node failure on node2" in log, (info, log)
    assert time_to_exit < 60, (time_to_exit, log)
    assert not orphans, f"still running on node2 {orphan_exit:.0f} s after the cut: {orphans}"
    assert PARTITION_WATCHDOG_S <= orphan_exit < PARTITION_WATCHDOG_S + 30, orphan_exit
    rank1 = (tmp_path / "logs" / f"hpcgan-train-{info['JobId']}.step0.rank1.log").read_text()
    ended = [line for line in rank1.splitlines() if ": error: " in line]
    assert len(ended) == 1 and re.search(
        rf"^hpcgan train: error: rank 1 on node2 has waited \d+ s in .* for the other ranks .*"
        rf"train.watchdog_s={PARTITION_WATCHDOG_S}\): cut off from its peers, ending it with exit 69$",
        ended[0],
    ), rank1[-3000:]
    saved = load_checkpoint(find_latest_valid(run / "checkpoints"))
    report_figure(
        f"node2's link cut at step {steps_done}: job {info['JobState']} ({info['ExitCode']}) "
        f"{time_to_exit:.1f} s later; newest checkpoint: step {saved['step']} "
        f"({steps_done - saved['step']} step(s) lost); the cut-off rank on node2 ended by its watchdog "
        f"(train.watchdog_s={PARTITION_WATCHDOG_S}) {orphan_exit:.1f} s after the cut: {ended[0].split(': error: ')[1]}"
    )


def signal_each(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:  # ended meanwhile
            pass


def test_rank0_node_dies_during_a_checkpoint_write_resume_uses_the_previous_one(
    cluster, horovod_pipeline, tmp_path, report_figure
):
    """node1 (rank 0, the coordinator that writes checkpoints) dies while a checkpoint is half written:
    every process of node1 is stopped (SIGSTOP) the moment a checkpoint temp file appears, and killed
    if the temp file is still there (else they go on until the next write). The job ends; the
    previous checkpoint stays the newest valid one and the index names it; train.sbatch on node2
    alone with --resume auto continues from it and removes the temp file."""
    dataset = horovod_pipeline[0] / "data" / "dataset"
    checkpoints = tmp_path / "run" / "checkpoints"
    job = train_on_two_nodes(cluster, tmp_path, dataset, 1000, "--no-requeue")
    node1 = cluster.node_ns["node1"]
    try:
        deadline = time.monotonic() + 60
        pids = cluster.namespace_pids(node1)  # slurmd, slurmstepd, batch script, srun, rank 0
        while True:
            temps = [name for name in os.listdir(checkpoints) if name.startswith(".ckpt-")]
            if not temps:
                assert time.monotonic() < deadline, "no checkpoint write caught in 60 s"
                time.sleep(0.002)
                continue
            signal_each(pids, signal.SIGSTOP)
            pids = sorted(set(pids) | set(cluster.namespace_pids(node1)))  # and any started since
            signal_each(pids, signal.SIGSTOP)
            if (checkpoints / temps[0]).exists():
                break  # frozen mid-write
            signal_each(pids, signal.SIGCONT)
        steps_done = last_logged_step(tmp_path / "run")
        previous = read_index(checkpoints)[-1]
        killed_at = time.monotonic()
        assert cluster.kill_node("node1") >= 2
        [info] = cluster.wait(job, 120)
        time_to_exit = time.monotonic() - killed_at
    finally:
        cluster.start_node("node1")
    assert info["JobState"] in ("NODE_FAIL", "FAILED"), (info, logs_of(tmp_path))
    assert (checkpoints / temps[0]).exists()  # the interrupted write, never renamed
    written = re.search(r"ckpt-\d+\.pt", temps[0])[0]
    assert previous["file"] < written  # zero-padded step numbers
    assert find_latest_valid(checkpoints).name == previous["file"]
    report_figure(
        f"node1 (rank 0) killed while writing {written} at step {steps_done}: job "
        f"{info['JobState']} {time_to_exit:.1f} s later; newest valid checkpoint: step {previous['step']} "
        f"({steps_done - previous['step']} step(s) lost)"
    )

    resumed = sbatch(
        cluster,
        tmp_path,
        "train.sbatch",
        "--set",
        f"train.steps={previous['step'] + 2}",
        *FAULT_TRAIN_ARGS,
        HPCGAN_NODES=1,
        HPCGAN_DATA=dataset,
        HPCGAN_RUN=tmp_path / "run",
        options=("--nodes=1", "--ntasks-per-node=1", "--nodelist=node2"),
    )
    wait_ok(cluster, resumed, tmp_path, 180)
    rank0 = (tmp_path / "logs" / f"hpcgan-train-{resumed}.step0.rank0.log").read_text()
    assert f"resuming from {previous['file']} (step {previous['step']})" in rank0, rank0
    assert not (checkpoints / temps[0]).exists()
    final = load_checkpoint(find_latest_valid(checkpoints))
    assert (final["step"], final["world_size"]) == (previous["step"] + 2, 1)
