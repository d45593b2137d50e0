"""The golden curve: the first logged losses of a tiny seeded CPU run (one process, one thread), stored
in tests/data/golden-curve.json. A numeric change in the networks, losses, data order or latents moves
them, and the diff shows in review: if the change is meant, regenerate the file with
  HPCGAN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/training/test_golden_curve.py
and commit it with the change that explains it."""

import json
import os

import pytest

from conftest import REPO, mpi_env, run_hpcgan
from test_train import train_args

GOLDEN = REPO / "tests" / "data" / "golden-curve.json"
STEPS = 10
SETS = ["train.seed=3", "loss.n_critic=2", "train.diffaugment=translation,cutout"]
# Summed in another order, float32 sums differ in the last bits; anything larger is a real change.
RTOL, ATOL = 1e-4, 1e-5


def logged_curve(run_dir) -> list:
    """Per logged step, the losses and training statistics (not the wall-clock figures)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = lambda k, v: isinstance(v, float) and k.startswith(("loss", "d_", "g_", "gp", "real", "fake"))  # noqa: E731
    return [
        {"step": line["step"], **{k: v for k, v in line.items() if keep(k, v)}} for line in lines if "loss_d" in line
    ]


def test_the_first_losses_of_a_seeded_run_match_the_golden_curve(sample_dataset, tmp_path):
    run_hpcgan(
        *train_args(sample_dataset, tmp_path / "run", STEPS, *SETS),
        check=True,
        env=mpi_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    )
    curve = logged_curve(tmp_path / "run")
    assert [point["step"] for point in curve] == list(range(1, STEPS + 1))
    assert {"loss_d", "loss_g"} <= set(curve[1])
    if os.environ.get("HPCGAN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"sets": SETS, "curve": curve}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["sets"] == SETS, "the run's settings changed: regenerate the golden curve (see the docstring)"
    for got, want in zip(curve, golden["curve"], strict=True):
        assert got.keys() == want.keys(), (got["step"], sorted(got.keys() ^ want.keys()))
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=RTOL, abs=ATOL), (got["step"], key, got[key], want[key])
