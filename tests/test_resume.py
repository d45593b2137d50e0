"""Resume and preemption: N steps + resume + N steps is bit-identical to 2N steps on 2 ranks; a signal on
one rank makes every rank checkpoint and exit 75, and resuming reaches the uninterrupted result; a
different world size resumes; a changed model is refused, a changed interval is not."""
import json
import os
import signal
import subprocess

import pytest
import torch

from conftest import hpcgan_cmd, mpi_env, mpirun_cmd, requires_mpirun, run_hpcgan, run_hpcgan_mpi
from test_train import _wait_for_rank, assert_states_equal, load_ckpt, train_args


def same_tree(a, b) -> bool:
    """Equality of nested dicts/lists of tensors and plain values (RNG states)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_tree, a, b))
    return a == b

EXIT_REQUEUE = 75


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("loss, extra", [
    ("wgan-gp", ["train.diffaugment=translation,cutout"]),
    ("bce", ["model.d_norm=batch", "model.d_input_noise=0.1", "model.g_dropout=0.1"]),
])
def test_resume_is_bit_exact(sample_dataset, tmp_path, loss, extra):
    # 6 training slices per rank-batch of 4 on 2 ranks: the runs cross epoch boundaries.
    sets = [f"loss.type={loss}", "checkpoint.every_steps=3", *extra]
    full, split = tmp_path / "full", tmp_path / "split"
    run_hpcgan_mpi(2, *train_args(sample_dataset, full, 8, *sets), check=True, timeout=240)
    run_hpcgan_mpi(2, *train_args(sample_dataset, split, 5, *sets), check=True, timeout=240)
    # Resume where the 5-step run stopped and go on to 8 (train.steps is a safe change).
    run_hpcgan_mpi(2, *train_args(sample_dataset, split, 8, *sets), "--resume", "auto", check=True, timeout=240)
    a, b = load_ckpt(full, 8), load_ckpt(split, 8)
    for key in ("G", "D", "G_ema"):
        assert_states_equal(a[key], b[key], skip_buffers=True)
    assert a["opt_G"]["state"].keys() == b["opt_G"]["state"].keys()
    for i in a["opt_D"]["state"]:
        assert_states_equal(a["opt_D"]["state"][i], b["opt_D"]["state"][i])
    assert same_tree(a["rng"], b["rng"]) and (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"])
    # The metrics log has one line per step, as if the run had never stopped.
    steps = [json.loads(l)["step"] for l in (split / "metrics.jsonl").read_text().splitlines() if "eval" not in l]
    assert steps == list(range(1, 9))


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_checkpoints_and_resumes(sample_dataset, tmp_path, signum):
    sets = ["loss.type=hinge", "model.g_norm=none", "model.d_norm=none"]
    run = tmp_path / "run"
    cmd = mpirun_cmd(2) + hpcgan_cmd(*train_args(sample_dataset, run, 100000, *sets))
    proc = subprocess.Popen(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_rank(proc, 1, run).send_signal(signum)  # only rank 1 hears it
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    stopped = load_ckpt(run)
    k = stopped["step"]
    assert 1 <= k < 100000
    # Resume to k + 3 steps and compare with an uninterrupted run of k + 3 steps.
    run_hpcgan_mpi(2, *train_args(sample_dataset, run, k + 3, *sets), "--resume", "auto", check=True, timeout=240)
    reference = tmp_path / "reference"
    run_hpcgan_mpi(2, *train_args(sample_dataset, reference, k + 3, *sets), check=True, timeout=240)
    a, b = load_ckpt(run), load_ckpt(reference)
    assert a["step"] == b["step"] == k + 3
    for key in ("G", "D", "G_ema"):
        assert_states_equal(a[key], b[key])


@pytest.mark.mpi
@requires_mpirun
def test_resume_on_a_different_world_size(sample_dataset, tmp_path):
    run = tmp_path / "run"
    run_hpcgan_mpi(2, *train_args(sample_dataset, run, 3), check=True, timeout=240)
    result = run_hpcgan(*train_args(sample_dataset, run, 6), "--resume", "auto", "--debug", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_ckpt(run)
    assert ckpt["step"] == 6 and ckpt["world_size"] == 1 and len(ckpt["rng"]) == 1
    assert "resuming a run of 2 x 4 images per step with 1 x 4" in result.stderr


def test_resume_refuses_a_changed_model_and_accepts_safe_changes(sample_dataset, tmp_path):
    run = tmp_path / "run"
    run_hpcgan(*train_args(sample_dataset, run, 2), check=True)
    refused = run_hpcgan(*train_args(sample_dataset, run, 4, "model.latent_dim=32"), "--resume", "auto")
    assert refused.returncode == 2 and "model.latent_dim" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert load_ckpt(run)["step"] == 2
    run_hpcgan(*train_args(sample_dataset, run, 4, "log.every_steps=2", "optim.lr=1e-4"), "--resume", "auto", check=True)
    assert load_ckpt(run)["step"] == 4


def test_resume_auto_starts_fresh_and_skips_a_corrupt_checkpoint(sample_dataset, tmp_path):
    run = tmp_path / "run"
    run_hpcgan(*train_args(sample_dataset, run, 2, "checkpoint.every_steps=1"), "--resume", "auto", check=True)
    newest = run / "checkpoints" / "ckpt-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, e.g. a node died mid-copy
    result = run_hpcgan(*train_args(sample_dataset, run, 3, "checkpoint.every_steps=1"), "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "ckpt-00000002.pt" in result.stderr  # the warning names the skipped file
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert load_ckpt(run)["step"] == 3


def test_resume_from_an_explicit_checkpoint_path(sample_dataset, tmp_path):
    run = tmp_path / "run"
    run_hpcgan(*train_args(sample_dataset, run, 2), check=True)
    missing = run_hpcgan(*train_args(sample_dataset, tmp_path / "other", 3), "--resume", tmp_path / "nope.pt")
    assert missing.returncode == 2 and "nope.pt" in missing.stderr
    run_hpcgan(*train_args(sample_dataset, tmp_path / "other", 3), "--resume", run / "checkpoints" / "ckpt-00000002.pt",
               check=True)
    assert load_ckpt(tmp_path / "other")["step"] == 3
