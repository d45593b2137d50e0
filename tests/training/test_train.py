"""`hpcgan train`: config and dataset validation on every rank, 2 ranks equal 1 process, the replicas
stay identical for every loss on both backends, same seed = same run, a dead rank ends the job, and the
run directory has what the coordinator promises (without dataset paths)."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from conftest import hpcgan_cmd, mpi_env, mpirun_cmd, requires_mpirun, run_hpcgan, run_hpcgan_mpi
from hpcgan.config import build
from hpcgan.models import build_discriminator, build_generator
from hpcgan.models.config import ModelConfig
from hpcgan.training.state import replica_digest

# A tiny model on the 64x64 dataset so that a step takes milliseconds on one core.
TINY = [
    "model.g_base_width=8",
    "model.d_base_width=8",
    "model.max_width=32",
    "model.latent_dim=16",
    "train.batch_size=4",
    "train.ema_decay=0.9",
    "log.every_steps=1",
    "log.sample_every_steps=0",
    "log.tensorboard=false",
    "checkpoint.every_steps=0",
]
# No batch statistics, no noise, no dropout: the step is a pure function of (weights, batch, latents).
PURE = [
    "model.g_norm=none",
    "model.d_norm=none",
    "model.g_dropout=0.0",
    "model.d_dropout=0.0",
    "model.d_input_noise=0.0",
    "train.diffaugment=''",
]


def train_args(dataset, out, steps, *sets, config="wgan-gp-64"):
    args = ["train", "--config", config, "--data", dataset, "--out", out, "--set", f"train.steps={steps}"]
    for s in [*TINY, *sets]:
        args += ["--set", s]
    return args


def load_ckpt(run_dir, step=None):
    ckpt_dir = run_dir / "checkpoints"
    name = f"ckpt-{step:08d}.pt" if step is not None else (ckpt_dir / "latest").read_text().strip()
    return torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)


def assert_states_equal(a: dict, b: dict, exact=True, skip_buffers=False):
    assert a.keys() == b.keys()
    for key in a:
        if skip_buffers and ("running_" in key or "num_batches" in key):
            continue
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


# --- validation before any collective ---------------------------------------------------------------
@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize(
    "sets, needle",
    [
        (["model.resolutoin=64"], "model.resolutoin"),
        (["model.resolution=128"], "model.resolution"),
        (["model.channels=3"], "model.channels"),
        (["model.d_norm=batch"], "d_norm"),  # WGAN-GP with a batch-norm critic
        (["optim.lr=-1"], "optim.lr"),
        (["train.batch_size=10000"], "global batch"),
    ],
)
def test_bad_config_exits_2_on_every_rank(sample_dataset, tmp_path, sets, needle):
    result = run_hpcgan_mpi(2, *train_args(sample_dataset, tmp_path / "run", 2, *sets), timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "hpcgan train: error" in line]
    assert len(errors) == 2 and all(needle in line for line in errors), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["eval.metrics=[swd,ssim]"], "eval.metrics"),
        (["eval.every_steps=2", "eval.metrics=[intensity]"], "checkpoint.best_metric"),
        (["eval.num_images=1"], "eval.num_images"),
    ],
)
def test_bad_eval_config_exits_2(sample_dataset, tmp_path, sets, needle):
    result = run_hpcgan(*train_args(sample_dataset, tmp_path / "run", 2, *sets))
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_missing_dataset_and_existing_run(sample_dataset, tmp_path):
    result = run_hpcgan(*train_args(tmp_path / "nope", tmp_path / "run", 2))
    assert result.returncode == 2 and str(tmp_path / "nope") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    run_hpcgan(*train_args(sample_dataset, tmp_path / "run", 2), check=True)
    again = run_hpcgan(*train_args(sample_dataset, tmp_path / "run", 2))
    assert again.returncode == 2 and "--resume auto" in again.stderr


# --- the run directory ----------------------------------------------------------------------------------
def test_single_process_run_dir(sample_dataset, tmp_path):
    run = tmp_path / "run"
    run_hpcgan(
        *train_args(
            sample_dataset,
            run,
            6,
            "log.sample_every_steps=3",
            "log.tensorboard=true",
            "checkpoint.every_steps=3",
            "checkpoint.keep=1",
        ),
        check=True,
    )
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all(line["images_per_s"] > 0 and "loss_d" in line and "loss_g" in line for line in lines)
    assert (run / "samples" / "grid-00000000.png").exists() and (run / "samples" / "grid-00000006.png").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt")) == ["ckpt-00000006.pt"]
    assert any((run / "tb").iterdir())
    ckpt = load_ckpt(run)
    assert ckpt["step"] == 6 and ckpt["config"]["train"]["steps"] == 6 and len(ckpt["rng"]) == 1
    assert ckpt["dataset"]["image_shape"] == [1, 64, 64]
    # run.json names the config and the dataset by their own names, never the dataset's location.
    source = json.loads((run / "run.json").read_text())
    assert source["config"] == "wgan-gp-64" and "log.tensorboard=true" in source["overrides"]
    assert source["dataset"]["name"] == sample_dataset.name
    assert source["dataset"]["splits"]["train"] == {"slices": 48, "subjects": 1}
    # Nothing in the run directory names the dataset's location.
    for path in run.rglob("*"):
        if path.is_file():
            assert str(sample_dataset).encode() not in path.read_bytes(), path


def test_same_seed_same_run(sample_dataset, tmp_path):
    for name in ("a", "b"):
        run_hpcgan(*train_args(sample_dataset, tmp_path / name, 4, "train.diffaugment=translation,cutout"), check=True)
    a, b = load_ckpt(tmp_path / "a"), load_ckpt(tmp_path / "b")
    for net in ("G", "D", "G_ema"):
        assert_states_equal(a[net], b[net])
    run_hpcgan(*train_args(sample_dataset, tmp_path / "c", 4, "train.seed=1"), check=True)
    c = load_ckpt(tmp_path / "c")
    assert any(not torch.equal(c["G"][k], a["G"][k]) for k in a["G"])


# --- distributed ------------------------------------------------------------------------------------------
@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_ranks_equal_one_process_with_twice_the_batch(sample_dataset, tmp_path, backend):
    sets = [*PURE, "loss.type=hinge", "train.ema_decay=0"]
    run_hpcgan(*train_args(sample_dataset, tmp_path / "one", 4, *sets, "train.batch_size=8"), check=True)
    run_hpcgan_mpi(
        2,
        *train_args(sample_dataset, tmp_path / "two", 4, *sets, "train.batch_size=4"),
        "--backend",
        backend,
        check=True,
        timeout=240,
    )
    assert_two_ranks_trained_like_one(tmp_path / "one", tmp_path / "two")
    losses_one = [json.loads(line)["loss_d"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    losses_two = [json.loads(line)["loss_d"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert losses_two == pytest.approx(losses_one, rel=1e-4, abs=1e-5)


def assert_two_ranks_trained_like_one(one_dir, two_dir, rtol=1e-4, atol=2e-5):
    """The last checkpoints of a 1-process and a 2-rank run hold the same weights and optimizer state."""
    one, two = load_ckpt(one_dir), load_ckpt(two_dir)
    assert two["world_size"] == 2
    for net in ("G", "D", "opt_G", "opt_D"):
        flat_one, flat_two = _tensors(one[net]), _tensors(two[net])
        assert flat_one.keys() == flat_two.keys()
        for key in flat_one:
            torch.testing.assert_close(
                flat_two[key], flat_one[key], rtol=rtol, atol=atol, msg=lambda m, net=net, key=key: f"{net} {key}: {m}"
            )


def _tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        return {prefix: obj.float()}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _tensors(value, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _tensors(value, f"{prefix}.{i}").items()}
    return {prefix: torch.tensor(float(obj))} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize(
    "loss, backend, extra",
    [
        ("bce", "horovod", ["model.d_norm=batch", "loss.label_smoothing=0.1", "train.diffaugment=translation"]),
        ("lsgan", "horovod", ["model.d_input_noise=0.1", "model.g_dropout=0.2"]),
        ("wgan", "horovod", ["loss.n_critic=2", "loss.clip_value=0.01"]),
        ("wgan-gp", "horovod", []),
        ("hinge", "horovod", ["model.spectral_norm=true"]),
        ("wgan-gp", "torch", ["train.diffaugment=color,translation"]),
    ],
)
def test_replicas_stay_identical(sample_dataset, tmp_path, loss, backend, extra):
    """Rank-local randomness (noise, dropout, augmentation, penalty mix) must never make the ranks'
    weights differ: the coordinator compares a digest of every rank's weights at each checkpoint."""
    run = tmp_path / "run"
    result = run_hpcgan_mpi(
        2,
        *train_args(sample_dataset, run, 4, f"loss.type={loss}", "checkpoint.every_steps=2", *extra),
        "--backend",
        backend,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_ckpt(run)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # ranks draw different noise...
    # ...and the digest every rank agreed on is that of the weights saved (a rank that drifts ends the
    # job: tests/training/test_train_options.py)
    cfg = build(ModelConfig, ckpt["config"]["model"], "checkpoint", "model.")
    G, D = build_generator(cfg), build_discriminator(cfg)
    G.load_state_dict(ckpt["G"])
    D.load_state_dict(ckpt["D"])
    assert ckpt["replica_digest"] == replica_digest(G, D)
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(torch.isfinite(torch.tensor(line[k])) for k in ("loss_d", "loss_g"))


@pytest.mark.mpi
@requires_mpirun
def test_a_dead_rank_ends_the_job(sample_dataset, tmp_path):
    cmd = mpirun_cmd(2) + hpcgan_cmd(*train_args(sample_dataset, tmp_path / "run", 100000))
    proc = subprocess.Popen(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        victim = _wait_for_rank(proc, 1, tmp_path / "run")
        victim.kill()
        killed_at = time.monotonic()
        proc.wait(timeout=30)
        assert proc.returncode != 0 and time.monotonic() - killed_at < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _wait_for_rank(proc, rank, run_dir, timeout=120):
    """The process of `rank` once training has made a step (metrics.jsonl has a line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().strip():
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("OMPI_COMM_WORLD_RANK") == str(rank):
                        return child
                except psutil.Error:
                    pass
        time.sleep(0.2)
    pytest.fail(f"rank {rank} never made a training step")


def test_evaluate_and_sample_score_the_images_that_training_evaluated(sample_dataset, tmp_path):
    """One generator of evaluation images (hpcgan.generation): `evaluate --checkpoint` and `sample` (then
    `evaluate --samples`) score exactly the images the run's evaluation during training scored, so a
    checkpoint gets the same numbers all three ways."""
    sets = ["eval.every_steps=3", "eval.metrics=[swd,intensity]", "eval.num_images=16", "checkpoint.every_steps=3"]
    run = tmp_path / "run"
    run_hpcgan(*train_args(sample_dataset, run, 3, *sets), check=True, timeout=240)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    during_training = next(line["eval"] for line in lines if line.get("step") == 3 and "eval" in line)
    scoring = ["evaluate", "--data", sample_dataset, "--metrics", "swd,intensity", "--max-real", 16, "--num-images", 16]
    run_hpcgan(*scoring, "--checkpoint", run, "--out", tmp_path / "checkpoint.json", check=True, timeout=240)
    sampling = ["sample", "--checkpoint", run, "--num-stacks", 2, "--stack-size", 8, "--format", "h5"]
    run_hpcgan(*sampling, "--out", tmp_path / "samples", check=True, timeout=240)
    run_hpcgan(*scoring, "--samples", tmp_path / "samples", "--out", tmp_path / "samples.json", check=True, timeout=240)
    for name in ("checkpoint.json", "samples.json"):
        metrics = json.loads((tmp_path / name).read_text())["metrics"]
        for metric in ("swd", "intensity"):
            assert metrics[metric]["value"] == pytest.approx(during_training[metric]["value"], rel=1e-4), (name, metric)


@pytest.mark.mpi
@requires_mpirun
def test_evaluation_during_training_keeps_the_best_checkpoint(sample_dataset, tmp_path):
    """eval.every_steps on rank 0 alone and shared across ranks score the same images (latent i is
    seeded by i), log them to metrics.jsonl, and the coordinator keeps the best checkpoint by SWD."""
    sets = [
        "eval.every_steps=2",
        "eval.metrics=[swd,intensity,memorization]",
        "eval.num_images=16",
        "checkpoint.every_steps=2",
        "checkpoint.keep=1",
        "checkpoint.best_metric=swd",
    ]
    evals = {}
    for shared in ("false", "true"):
        run = tmp_path / shared
        run_hpcgan_mpi(2, *train_args(sample_dataset, run, 6, *sets, f"eval.shared={shared}"), check=True, timeout=240)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals[shared] = {line["step"]: line["eval"] for line in lines if "eval" in line}
        assert sorted(evals[shared]) == [2, 4, 6]
        swd = {step: e["swd"]["value"] for step, e in evals[shared].items()}
        best = min(swd, key=swd.get)
        assert (run / "checkpoints" / "best").read_text().strip() == f"ckpt-{best:08d}.pt"
        assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt")) == sorted(
            {f"ckpt-{best:08d}.pt", "ckpt-00000006.pt"}
        )
        assert all(e["swd"]["baseline"] > 0 and e["memorization"]["value"] is not None for e in evals[shared].values())
    for step in (2, 4, 6):
        for metric in ("swd", "intensity", "memorization"):
            assert evals["true"][step][metric]["value"] == pytest.approx(
                evals["false"][step][metric]["value"], rel=1e-4, abs=1e-6
            ), (step, metric)
