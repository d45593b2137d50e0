"""`make demo` (scripts/demo.sh) runs the whole pipeline green, and a second run reuses its outputs.

The script is run as `make demo` runs it (after the set-up), into a temp dir. Its outputs are checked
for what each stage promises; the second run must find the dataset and the finished run valid
(no "--overwrite" refusal, no retraining) and still exit 0.
"""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, mpi_env, requires_mpirun, run_cmd
from hpcgan.training.checkpointing import find_latest_valid, load_checkpoint
from hpcgan.stacks import contact_sheet

pytestmark = [pytest.mark.mpi, pytest.mark.slow, requires_mpirun]


def test_demo_runs_the_pipeline_and_reruns_cleanly(tmp_path):
    demo = tmp_path / "demo"
    env = mpi_env({"HPCGAN_DEMO_DIR": str(demo)})
    first = run_cmd(["bash", str(REPO / "scripts" / "demo.sh")], env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]

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
    assert (demo / "run" / "report.html").exists()
    shards = {p.name: p.stat().st_mtime_ns for p in (demo / "dataset").glob("*.h5")}
    assert len(shards) == 2

    second = run_cmd(["bash", str(REPO / "scripts" / "demo.sh")], env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (demo / "dataset").glob("*.h5")} == shards  # shards reused
    assert "run finished at step 300" in second.stderr
    assert load_checkpoint(find_latest_valid(demo / "run" / "checkpoints"))["step"] == 300
