"""Crash consistency (issue 17.2): whatever a hard kill leaves in a run directory (a torn last line in
metrics.jsonl, a checkpoint's temp file, a checkpoint the index does not list, TensorBoard events past
the checkpoint) never stops `--resume auto`, and the resumed run equals an uninterrupted one: the
crafted state of a kill mid-append and mid-checkpoint on one process, and a real SIGKILL of a whole
2-rank job (mpirun and both ranks) mid-training."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import hpcgan_cmd, kill_job, mpi_env, mpirun_cmd, requires_mpirun, run_cmd, run_hpcgan, run_hpcgan_mpi
from hpcgan.training.checkpointing import find_latest_valid, load_checkpoint
from hpcgan.io import read_jsonl
from hpcgan.runs import last_evaluation, read_metrics
from test_resume import differences, metrics_lines
from test_train import load_ckpt, train_args

TORN = '{"step": 5, "epoch": 0, "time_s": 17.5, "loss_d": 0.12'  # a line cut short by SIGKILL


def test_every_reader_drops_a_torn_last_line(tmp_path, warnings_of_hpcgan):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss_d": 1.0}, {"step": 2, "eval": {"swd": {"value": 3.5}}}, {"step": 2, "loss_d": 0.5}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + TORN)
    assert read_jsonl(path) == lines
    assert f"{path}: dropping an incomplete last line ({len(TORN)} bytes" in warnings_of_hpcgan.text
    assert read_metrics(path) == ([lines[0], lines[2]], [lines[1]])  # hpcgan report
    assert last_evaluation(path, "swd") == (3.5, 2, None)  # hpcgan sweep-summary: (value, step, memorization)
    # A damaged line elsewhere is skipped and named; a missing file is an empty log.
    path.write_text(json.dumps(lines[0]) + "\n\x00\x00garbage\n" + json.dumps(lines[2]) + "\n")
    assert read_jsonl(path) == [lines[0], lines[2]] and "line 2 is not a JSON object" in warnings_of_hpcgan.text
    assert read_jsonl(tmp_path / "none.jsonl") == []


def test_resume_after_a_kill_mid_append_and_mid_checkpoint(sample_dataset, tmp_path):
    """The state a kill at step 5 leaves when checkpoints come every 3 steps: the checkpoint of step 3,
    a complete line for step 4 (and an evaluation nobody checkpointed), a torn line for step 5, the temp
    file of a checkpoint write that never finished. Fails on a main that json-decodes every line."""
    sets = ["checkpoint.every_steps=3"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    run_hpcgan(*train_args(sample_dataset, killed, 3, *sets), check=True)
    with open(killed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "epoch": 0, "loss_d": 123.0}) + "\n")
        f.write(json.dumps({"step": 4, "eval": {"swd": {"value": 1.0}}}) + "\n" + TORN)
    ckpt_dir = killed / "checkpoints"
    temp = ckpt_dir / ".ckpt-00000006.pt.k1ll3d_x.tmp.pt"  # atomic_path's name for ckpt-00000006.pt
    temp.write_bytes((ckpt_dir / "ckpt-00000003.pt").read_bytes()[:5000])

    result = run_hpcgan(*train_args(sample_dataset, killed, 8, *sets), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from ckpt-00000003.pt (step 3)" in result.stderr
    assert "dropping an incomplete last line" in result.stderr and "metrics.jsonl" in result.stderr
    assert not temp.exists()
    run_hpcgan(*train_args(sample_dataset, reference, 8, *sets), check=True)
    # Every line parses (nothing glued onto the torn one), one per step, equal to the uninterrupted run.
    assert metrics_lines(killed) == metrics_lines(reference)
    assert [line["step"] for line in metrics_lines(killed)] == list(range(1, 9))
    assert differences(load_ckpt(killed), load_ckpt(reference)) == []


def tensorboard_scalars(run_dir, tag) -> dict:
    """step -> value of a TensorBoard scalar, as TensorBoard shows it (purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars(tag)
    assert len({s.step for s in scalars}) == len(scalars), "a step is shown twice"
    return {s.step: s.value for s in scalars}


@pytest.mark.mpi
@requires_mpirun
def test_sigkill_of_a_two_rank_job_then_resume(sample_dataset, tmp_path):
    """kill -9 of mpirun and both ranks while they train, checkpoints every 2 steps; the
    resumed run (--resume auto) equals an uninterrupted one in every checkpoint entry, every metrics
    line and every TensorBoard scalar."""
    sets = ["checkpoint.every_steps=2", "log.tensorboard=true", "loss.type=hinge"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    cmd = mpirun_cmd(2) + hpcgan_cmd(*train_args(sample_dataset, killed, 100000, *sets))
    proc = subprocess.Popen(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # Kill once a checkpoint exists and training has gone past it: mid-step, most likely.
        while not (killed / "checkpoints" / "latest").exists() or len(read_jsonl(killed / "metrics.jsonl")) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len([p for p in ranks if "hpcgan" in " ".join(p.cmdline())]) == 2
    finally:
        kill_job(proc.pid)  # mpirun and both ranks
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not any(p.is_running() for p in ranks)

    newest = find_latest_valid(killed / "checkpoints")  # what --resume auto takes
    k = load_checkpoint(newest)["step"]
    resumed = run_hpcgan_mpi(2, *train_args(sample_dataset, killed, k + 3, *sets), "--resume", "auto", timeout=240)
    assert resumed.returncode == 0 and f"resuming from {newest.name} (step {k})" in resumed.stderr, resumed.stderr[
        -3000:
    ]
    run_hpcgan_mpi(2, *train_args(sample_dataset, reference, k + 3, *sets), check=True, timeout=240)
    assert differences(load_ckpt(killed), load_ckpt(reference)) == []
    assert metrics_lines(killed) == metrics_lines(reference)
    assert tensorboard_scalars(killed, "train/loss_d") == tensorboard_scalars(reference, "train/loss_d")


# Runs `hpcgan` with os.fsync and os.replace observed: each fsync'd path (with the metrics.jsonl lines on
# disk at that moment) and each rename's target, in order, one JSON line each, in $FSYNC_LOG.
OBSERVED_HPCGAN = """
import json, os, sys, threading
from hpcgan.cli import main
log, lock, fsync, replace = open(os.environ["FSYNC_LOG"], "a"), threading.Lock(), os.fsync, os.replace
def note(**event):
    with lock:
        log.write(json.dumps(event) + "\\n"); log.flush()
def observed_fsync(fd):
    fsync(fd)
    path = os.readlink(f"/proc/self/fd/{fd}")
    lines = open(path).read().splitlines() if path.endswith("metrics.jsonl") else None
    note(fsync=path, lines=lines)
def observed_replace(src, dst):
    replace(src, dst)
    note(replace=os.path.abspath(dst))
os.fsync, os.replace = observed_fsync, observed_replace
sys.exit(main(sys.argv[1:]))
"""


def test_metrics_are_durable_before_the_checkpoint_that_describes_them(sample_dataset, tmp_path):
    """Every checkpoint of a real run is renamed into place only after metrics.jsonl, holding every line of
    the checkpoint's step and before, and the run directory (its entry) were fsynced: a crash just after
    the rename cannot leave a log that lacks them. Fails where metrics.jsonl is never fsynced."""
    run, events_log = tmp_path / "run", tmp_path / "events.jsonl"
    args = train_args(sample_dataset, run, 4, "checkpoint.every_steps=2", "eval.every_steps=2")
    cmd = [sys.executable, "-c", OBSERVED_HPCGAN, *map(str, args)]
    run_cmd(cmd, env=mpi_env({"FSYNC_LOG": str(events_log)}), check=True)
    events = read_jsonl(events_log)
    final_lines = (run / "metrics.jsonl").read_text().splitlines()
    renamed = [(i, e["replace"]) for i, e in enumerate(events) if e.get("replace", "").endswith(".pt")]
    assert [os.path.basename(path) for _, path in renamed] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    for at, path in renamed:
        step = load_checkpoint(path)["step"]
        described = [line for line in final_lines if json.loads(line)["step"] <= step]
        synced = [i for i, e in enumerate(events[:at]) if e.get("fsync") == str(run / "metrics.jsonl")]
        assert synced, f"metrics.jsonl was not fsynced before {path} was renamed into place"
        assert events[synced[-1]]["lines"][: len(described)] == described, "lines of the step were not on disk"
        assert any(e.get("fsync") == str(run) for e in events[synced[-1] : at]), "the run directory was not fsynced"
