"""`make demo` (scripts/demo.sh) runs the whole pipeline green and ends with the figures it promises.

The script runs as `make demo` runs it (after the set-up), into a temp dir, twice: first as `make demo QUICK=1`
(300 steps: the pipeline's outputs, the reading session, the report's title and the plain-words ending), then
as `make demo`, which reuses the dataset and continues the same run to 1500 steps. The second run's figures are
what the demo promises a new user: SWD within 2x of its real-vs-real baseline and memorisation within 2x of its
own, from the checkpoint the memorisation guard selected; a regression in training quality fails here.
"""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, mpi_env, requires_mpirun, run_cmd
from hpcgan.metrics import baseline_ratio
from hpcgan.stacks import contact_sheet
from hpcgan.training.checkpointing import find_latest_valid, load_checkpoint, run_selection

pytestmark = [pytest.mark.mpi, pytest.mark.slow, requires_mpirun]

PROMISED_RATIO = 2.0


def run_demo(env, quick: bool):
    result = run_cmd(
        ["bash", str(REPO / "scripts" / "demo.sh")], env={**env, "HPCGAN_DEMO_QUICK": str(int(quick))}, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def words(text) -> str:
    """The demo's plain-words ending, unwrapped."""
    return " ".join(text.split())


def test_quick_demo_then_the_full_demo_reaches_the_promised_figures(tmp_path):
    demo = tmp_path / "demo"
    env = mpi_env({"HPCGAN_DEMO_DIR": str(demo)})
    quick = run_demo(env, quick=True)

    manifest = json.loads((demo / "dataset" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["slices"] == 48 and manifest["splits"]["val"]["slices"] == 48
    state = load_checkpoint(find_latest_valid(demo / "run" / "checkpoints"))
    assert (state["step"], state["world_size"]) == (300, 2)
    for k in range(2):
        with h5py.File(demo / "samples" / f"stack-{k:05d}.h5") as f:
            images = f["images"][:]
        assert images.shape == (100, 1, 64, 64)
        assert nib.load(demo / "samples" / f"stack-{k:05d}.nii.gz").shape == (64, 64, 100)
        with Image.open(demo / "samples" / f"stack-{k:05d}.png") as im:  # the stack's 10x10 contact sheet
            assert np.array_equal(np.asarray(im), contact_sheet(images, nrow=10))
    evaluation = json.loads((demo / "samples" / "evaluation.json").read_text())
    assert {"swd", "msssim", "intensity", "memorization"} <= set(evaluation["metrics"])
    assert len(list((demo / "reading" / "images").iterdir())) == 40 and (demo / "reading.key.json").exists()
    report = (demo / "run" / "report.html").read_text()
    # The title names the run, its config and its dataset; the curves and the selection are there.
    title = "run: wgan-gp-64 (7 overrides) on dataset dataset (t1, 64x64; train: 1 subject, 48 slices; val: 1 subject"
    assert f"<h1>Run {title}" in report
    assert "metrics.png" in report and "No evaluation during training" not in report
    assert "guard 0.04" in report
    assert "300 steps (QUICK=1) show the pipeline, not the result" in words(quick.stdout)
    assert f"{demo}/run/report.html" in quick.stdout and f"{demo}/reading/index.html" in quick.stdout
    shards = {p.name: p.stat().st_mtime_ns for p in (demo / "dataset").glob("*.h5")}
    assert len(shards) == 2

    full = run_demo(env, quick=False)
    assert {p.name: p.stat().st_mtime_ns for p in (demo / "dataset").glob("*.h5")} == shards  # shards reused
    assert "resuming from ckpt-00000300.pt (step 300)" in full.stderr  # continued, not restarted
    assert load_checkpoint(find_latest_valid(demo / "run" / "checkpoints"))["step"] == 1500
    # The samples and their evaluation come from the checkpoint the guard selected, and the figures are near real.
    index = json.loads((demo / "samples" / "index.json").read_text())
    assert index["step"] == run_selection(demo / "run")["step"]
    assert "<= guard 0.04 (checkpoint.max_memorization)" in index["checkpoint_selection"]
    metrics = json.loads((demo / "samples" / "evaluation.json").read_text())["metrics"]
    for name in ("swd", "memorization"):
        assert baseline_ratio(name, metrics[name]) <= PROMISED_RATIO, (name, metrics[name])
    assert "In short: realism within 2x of the real baseline" in words(full.stdout)
