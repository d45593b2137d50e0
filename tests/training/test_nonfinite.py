"""Non-finite losses (issue 11.3): a NaN in the data of one rank only, under a real 2-rank mpirun, stops
every rank together (exit 65, one line naming the step, the loss and the rank, no non-finite checkpoint),
or with train.nonfinite=rollback reloads the newest checkpoint and goes on with the next data, at most
train.max_rollbacks times."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import requires_mpirun, run_hpcgan, run_hpcgan_mpi
from hpcgan.training.checkpointing import INDEX_NAME, find_latest_valid, read_index
from hpcgan.data import RankSampler, SliceDataset
from hpcgan.errors import UsageError
from hpcgan.io import sha256_file
from hpcgan.training.checks import load_train_config
from hpcgan.errors import EXIT_NONFINITE
from hpcgan.training.steps import MIN_FP16_SCALE, nonfinite_reason
from test_train import train_args

WORLD, BATCH = 2, 4  # 48 training slices: 6 global batches per epoch


def poisoned_copy(sample_dataset, tmp_path, batches, rank=1, world=WORLD, batch=BATCH):
    """A copy of the dataset in which one image that `rank` reads in each of `batches` (of epoch 0,
    seed 0) is NaN. The other ranks' images of those batches stay as they were."""
    dataset = tmp_path / "dataset"
    shutil.copytree(sample_dataset, dataset)
    slices = SliceDataset(dataset, "train")
    order = RankSampler(len(slices), rank, world, batch).permutation()
    for b in batches:
        name, row = slices.locate(int(order[b * batch * world + rank * batch]))
        with h5py.File(dataset / name, "r+") as f:
            f["images"][row] = np.nan
    return dataset


def checkpoint_steps(run):
    return sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("ckpt-*.pt"))


def assert_finite_checkpoints(run):
    """Every checkpoint file is indexed, matches its checksum and holds finite numbers only."""
    ckpt_dir = run / "checkpoints"
    index = read_index(ckpt_dir)
    assert sorted(e["file"] for e in index) == sorted(p.name for p in ckpt_dir.glob("ckpt-*.pt"))
    assert not [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")]  # no temp files
    for entry in index:
        assert sha256_file(ckpt_dir / entry["file"]) == entry["sha256"]
        state = torch.load(ckpt_dir / entry["file"], map_location="cpu", weights_only=True)
        for net in ("G", "D", "G_ema"):
            for key, t in state[net].items():
                assert not t.is_floating_point() or torch.isfinite(t).all(), (entry["file"], net, key)
    return index


def metrics_lines(run):
    # json.loads accepts NaN; parse_constant turns it into an error so a non-finite loss line fails here.
    return [
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def error_lines(stderr, needle):
    return [line for line in stderr.splitlines() if needle in line]


# --- the check itself ---------------------------------------------------------------------------------
def test_nonfinite_reason_names_the_cause_first():
    net = torch.nn.Linear(3, 2)
    finite, nan, inf = torch.tensor(1.5), torch.tensor(float("nan")), torch.tensor(float("inf"))
    assert nonfinite_reason({"loss_d": finite, "loss_g": finite}, {"D": net}, {}) is None
    assert nonfinite_reason({"loss_d": nan, "loss_g": inf}, {"D": net}, {}) == ("loss_d", "loss_d is nan")
    assert nonfinite_reason({"loss_d": finite, "loss_g": inf}, {"D": net}, {}) == ("loss_g", "loss_g is inf")
    with torch.no_grad():
        net.bias[1] = float("-inf")
    assert nonfinite_reason({"loss_d": finite}, {"D": net}, {})[0] == "weights"
    bn = torch.nn.BatchNorm1d(2)
    bn.running_var[0] = float("nan")  # a poisoned batch reaches the batch-norm statistics
    assert nonfinite_reason({"loss_d": finite}, {"G": bn}, {}) == ("weights", "the weights of G are not finite")


def test_fp16_scaler_overflowing_step_after_step_counts_as_nonfinite():
    """The real GradScaler: each overflowing step is skipped and halves the scale; the check fires once
    the scale is below MIN_FP16_SCALE (2**16 halved 17 times), not on a few overflows."""
    weight = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    overflows = 0
    while scaler.get_scale() >= MIN_FP16_SCALE:
        assert nonfinite_reason({"loss_d": torch.tensor(0.0)}, {"D": torch.nn.Linear(1, 1)}, {"D": scaler}) is None
        opt.zero_grad()
        scaler.scale((weight * float("inf")).sum()).backward()
        scaler.step(opt)  # skipped: the gradients are inf
        scaler.update()
        overflows += 1
    assert overflows == 17 and torch.equal(weight.detach(), torch.ones(2))
    kind, text = nonfinite_reason({"loss_d": torch.tensor(0.0)}, {"D": torch.nn.Linear(1, 1)}, {"D": scaler})
    assert kind == "weights" and "fp16 gradient scale of D" in text


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["train.nonfinite=skip"], "'train.nonfinite' must be one of stop, rollback"),
        (["train.max_rollbacks=-1"], "train.max_rollbacks: must be >= 0"),
    ],
)
def test_bad_nonfinite_config_is_a_usage_error(sets, needle):
    with pytest.raises(UsageError, match=needle):
        load_train_config("wgan-gp-64", sets)


# --- stop ---------------------------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.slow
@requires_mpirun
def test_nan_on_one_rank_stops_every_rank(sample_dataset, tmp_path):
    dataset = poisoned_copy(sample_dataset, tmp_path, batches=[2])  # rank 1's data of step 3
    run = tmp_path / "run"
    result = run_hpcgan_mpi(
        WORLD,
        *train_args(dataset, run, 6, "checkpoint.every_steps=2", "checkpoint.keep=10"),
        "--backend",
        "horovod",
        timeout=240,
    )
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    lines = error_lines(result.stderr, "step 3:")
    assert len(lines) == 1 and "loss_d is nan on rank 1" in lines[0] and f"exit {EXIT_NONFINITE}" in lines[0], (
        result.stderr[-3000:]
    )
    assert "Traceback" not in result.stderr and "run finished" not in result.stderr
    # Step 2's checkpoint is all there is: step 3's weights (NaN on every rank) were never written.
    assert [e["step"] for e in assert_finite_checkpoints(run)] == [2] and checkpoint_steps(run) == [2]
    assert (run / "checkpoints" / "latest").read_text().strip() == "ckpt-00000002.pt"
    assert [line["step"] for line in metrics_lines(run)] == [1, 2]


# --- rollback -----------------------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.slow
@requires_mpirun
def test_rollback_continues_with_the_next_data_then_gives_up(sample_dataset, tmp_path):
    """Batches 2 and 4 are poisoned on rank 1, train.max_rollbacks=1: step 3 (batch 2) rolls back to step 2,
    step 3 again runs on batch 3 and is checkpointed with finite weights, step 4 (batch 4) fails with no
    rollback left and every rank stops. On torch.distributed (the stop test above runs on Horovod)."""
    dataset = poisoned_copy(sample_dataset, tmp_path, batches=[2, 4])
    run = tmp_path / "run"
    result = run_hpcgan_mpi(
        WORLD,
        *train_args(
            dataset,
            run,
            6,
            "checkpoint.every_steps=1",
            "checkpoint.keep=10",
            "train.nonfinite=rollback",
            "train.max_rollbacks=1",
        ),
        "--backend",
        "torch",
        timeout=240,
    )
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    assert (
        len(
            error_lines(
                result.stderr,
                "step 3: loss_d is nan on rank 1: rolling back to the newest checkpoint (rollback 1 of 1)",
            )
        )
        == 1
    ), result.stderr[-3000:]
    assert len(error_lines(result.stderr, "rollback 1: back to ckpt-00000002.pt (step 2) after step 3")) == 1
    gave_up = error_lines(result.stderr, "step 4: loss_d is nan on rank 1")
    assert len(gave_up) == 1 and "giving up after 1 rollback" in gave_up[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [e["step"] for e in assert_finite_checkpoints(run)] == [1, 2, 3]
    assert find_latest_valid(run / "checkpoints").name == "ckpt-00000003.pt"
    after = torch.load(run / "checkpoints" / "ckpt-00000003.pt", map_location="cpu", weights_only=True)
    # Three steps on four batches: the poisoned batch 2 was skipped, not replayed; the latents moved on.
    assert (after["step"], after["batch_in_epoch"], after["rollbacks"]) == (3, 4, 1)
    lines = metrics_lines(run)
    assert [line["step"] for line in lines if "loss_d" in line] == [1, 2, 3]  # the abandoned step 3 is gone
    assert [line["rollback"] for line in lines if "rollback" in line] == [{"count": 1, "failed_step": 3}]


def test_rollback_without_a_checkpoint_stops(sample_dataset, tmp_path):
    dataset = poisoned_copy(sample_dataset, tmp_path, batches=[0], rank=0, world=1, batch=8)
    run = tmp_path / "run"
    result = run_hpcgan(*train_args(dataset, run, 3, "train.batch_size=8", "train.nonfinite=rollback"))
    assert result.returncode == EXIT_NONFINITE, result.stderr[-3000:]
    assert len(error_lines(result.stderr, "step 1: loss_d is nan on rank 0: rolling back")) == 1
    assert len(error_lines(result.stderr, "step 1: no checkpoint to roll back to")) == 1
    assert not list((run / "checkpoints").glob("ckpt-*")) and not (run / "checkpoints" / INDEX_NAME).exists()
