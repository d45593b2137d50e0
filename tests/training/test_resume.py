"""Resume and preemption: N steps + resume + N steps is bit-identical to 2N steps on 2 ranks (every
entry of the checkpoint: weights, each rank's batch-norm statistics, optimizer state values, scalers,
RNG states, data position, and the metrics log); a signal on one rank makes every rank checkpoint and
exit 75, and resuming reaches the uninterrupted result; a different world size resumes at the rescaled
data position; a changed model is refused, a changed interval is not."""

import json
import signal
import subprocess

import pytest
import torch

from conftest import hpcgan_cmd, kill_job, mpi_env, mpirun_cmd, requires_mpirun, run_hpcgan, run_hpcgan_mpi
from test_train import _wait_for_rank, load_ckpt, train_args

EXIT_REQUEUE = 75
TIMING_KEYS = ("time_s", "images_per_s", "data_wait", "allreduce_wait")


def differences(a, b, path="checkpoint") -> list:
    """Where two nested states (dicts, lists, tensors, plain values) differ; tensors bitwise, with
    dtype and shape. [] when they are identical."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} entries"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def metrics_lines(run_dir) -> list:
    """metrics.jsonl without the wall-clock figures, which differ between any two runs."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def train_in_one_go_and_resumed(build_args, dataset, tmp_path, steps, stop_at, sets) -> tuple:
    """(full, split) run directories: `steps` steps on 2 ranks in one go, and stopped at `stop_at` then
    resumed (train.steps is a safe change) to `steps`; build_args(dataset, out, steps, *sets) is the command."""
    full, split = tmp_path / "full", tmp_path / "split"
    run_hpcgan_mpi(2, *build_args(dataset, full, steps, *sets), check=True, timeout=240)
    run_hpcgan_mpi(2, *build_args(dataset, split, stop_at, *sets), check=True, timeout=240)
    run_hpcgan_mpi(2, *build_args(dataset, split, steps, *sets), "--resume", "auto", check=True, timeout=240)
    return full, split


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize(
    "loss, extra",
    [
        ("wgan-gp", ["train.diffaugment=translation,cutout"]),
        ("bce", ["model.d_norm=batch", "model.d_input_noise=0.1", "model.g_dropout=0.1"]),
    ],
)
def test_resume_is_bit_exact(sample_dataset, tmp_path, loss, extra):
    # 6 training slices per rank-batch of 4 on 2 ranks: the runs cross epoch boundaries.
    sets = [f"loss.type={loss}", "checkpoint.every_steps=3", *extra]
    full, split = train_in_one_go_and_resumed(train_args, sample_dataset, tmp_path, 8, 5, sets)
    a, b = load_ckpt(full, 8), load_ckpt(split, 8)
    # Everything: G, D, G-EMA with their buffers, each rank's own batch-norm statistics, optimizer
    # state values and hyper-parameters, scalers, every rank's RNG, epoch and batch, config.
    assert differences(a, b) == []
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (8, 1, 2)
    # The statistics are really per rank (the ranks saw different images) and G holds their mean,
    # so the comparison above covers what the ranks train with and what sampling uses.
    own = [a["rank_buffers"][r]["G"] for r in (0, 1)]
    stats = [k for k in own[0] if "running_" in k]
    assert stats and all(not torch.equal(own[0][k], own[1][k]) for k in stats)
    assert all(torch.equal(a["G"][k], (own[0][k] + own[1][k]) / 2) for k in stats)
    # The metrics log has one line per step, with the same numbers, as if the run had never stopped.
    assert [line["step"] for line in metrics_lines(split)] == list(range(1, 9))
    assert metrics_lines(split) == metrics_lines(full)


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_checkpoints_and_resumes(sample_dataset, tmp_path, signum):
    sets = ["loss.type=hinge", "model.g_norm=none", "model.d_norm=none"]
    run = tmp_path / "run"
    cmd = mpirun_cmd(2) + hpcgan_cmd(*train_args(sample_dataset, run, 100000, *sets))
    proc = subprocess.Popen(
        cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_for_rank(proc, 1, run).send_signal(signum)  # only rank 1 hears it
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_job(proc.pid)
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
    assert differences(a, b) == []
    assert metrics_lines(run) == metrics_lines(reference)


@pytest.mark.mpi
@requires_mpirun
def test_resume_on_a_different_world_size(sample_dataset, tmp_path):
    """2 ranks x 4 images for 3 steps have seen 24 images of epoch 0: one process with 4 images per
    step continues that epoch at its batch 6 (not 3: the position is kept in images, not in steps)."""
    slices = json.loads((sample_dataset / "manifest.json").read_text())["splits"]["train"]["slices"]
    run = tmp_path / "run"
    run_hpcgan_mpi(2, *train_args(sample_dataset, run, 3), check=True, timeout=240)
    assert (load_ckpt(run)["epoch"], load_ckpt(run)["batch_in_epoch"]) == (0, 3)
    # Go on past the end of the epoch: one process has slices // 4 batches per epoch.
    per_epoch = slices // 4
    steps = 3 + per_epoch - 6 + 1
    result = run_hpcgan(*train_args(sample_dataset, run, steps), "--resume", "auto", "--debug", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming a run of 2 x 4 images per step with 1 x 4: continuing epoch 0 at batch 6" in result.stderr
    ckpt = load_ckpt(run)
    assert ckpt["step"] == steps and ckpt["world_size"] == 1 and len(ckpt["rng"]) == len(ckpt["rank_buffers"]) == 1
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 1)
    assert [line["epoch"] for line in metrics_lines(run)] == [0] * (steps - 1) + [1]


def test_resume_refuses_a_changed_model_and_accepts_safe_changes(sample_dataset, tmp_path):
    run = tmp_path / "run"
    run_hpcgan(*train_args(sample_dataset, run, 2), check=True)
    refused = run_hpcgan(*train_args(sample_dataset, run, 4, "model.latent_dim=32"), "--resume", "auto")
    assert refused.returncode == 2 and "model.latent_dim" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert load_ckpt(run)["step"] == 2
    run_hpcgan(
        *train_args(sample_dataset, run, 4, "log.every_steps=2", "optim.lr=1e-4"), "--resume", "auto", check=True
    )
    assert load_ckpt(run)["step"] == 4


def test_resume_auto_starts_fresh_skips_a_corrupt_checkpoint_and_ends_a_finished_run(sample_dataset, tmp_path):
    run = tmp_path / "run"
    run_hpcgan(*train_args(sample_dataset, run, 2, "checkpoint.every_steps=1"), "--resume", "auto", check=True)
    newest = run / "checkpoints" / "ckpt-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, e.g. a node died mid-copy
    result = run_hpcgan(*train_args(sample_dataset, run, 3, "checkpoint.every_steps=1"), "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "ckpt-00000002.pt" in result.stderr  # the warning names the skipped file
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert load_ckpt(run)["step"] == 3
    # Run again once finished (a second `make demo`): it ends at once, and the run stays as it was.
    newest = run / "checkpoints" / "ckpt-00000003.pt"
    before = (newest.read_bytes(), (run / "metrics.jsonl").read_text())
    again = run_hpcgan(*train_args(sample_dataset, run, 3, "checkpoint.every_steps=1"), "--resume", "auto")
    assert again.returncode == 0 and "run finished at step 3" in again.stderr, again.stderr
    assert (newest.read_bytes(), (run / "metrics.jsonl").read_text()) == before


def test_resume_from_an_explicit_checkpoint_path(sample_dataset, tmp_path):
    run = tmp_path / "run"
    run_hpcgan(*train_args(sample_dataset, run, 2), check=True)
    missing = run_hpcgan(*train_args(sample_dataset, tmp_path / "other", 3), "--resume", tmp_path / "nope.pt")
    assert missing.returncode == 2 and "nope.pt" in missing.stderr
    run_hpcgan(
        *train_args(sample_dataset, tmp_path / "other", 3),
        "--resume",
        run / "checkpoints" / "ckpt-00000002.pt",
        check=True,
    )
    assert load_ckpt(tmp_path / "other")["step"] == 3
