"""`hpcgan evaluate` end to end on real slices: the table and JSON, the same numbers on 1 and 2
ranks (real mpirun), the --checkpoint path, and one-line refusals of bad input."""
import json

import numpy as np
import pytest

from hpcgan.data import read_slices
from hpcgan.stacks import write_stack_h5
from tests.conftest import requires_mpirun, run_hpcgan, run_hpcgan_mpi

ALL = "swd,msssim,intensity,memorization,fid"


def write_samples(directory, images, stack_size=30):
    """A sample directory as `hpcgan sample` writes it: stack-*.h5 of (N, C, H, W) float32."""
    directory.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(images), stack_size)):
        write_stack_h5(directory / f"stack-{k:05d}.h5", images[start:start + stack_size], {"step": 7, "seed": 0})
    return directory


@pytest.fixture(scope="module")
def samples(sample_dataset, tmp_path_factory):
    """Training slices shifted by a pixel plus noise (a memorising 'generator') mixed with validation slices."""
    train, val = read_slices(sample_dataset, "train"), read_slices(sample_dataset, "val")
    rng = np.random.default_rng(0)
    copies = np.clip(np.roll(train[:24], 1, axis=3) + rng.normal(0, 0.02, train[:24].shape), -1, 1)
    images = np.concatenate([copies, val[:36]]).astype(np.float32)
    return write_samples(tmp_path_factory.mktemp("samples") / "samples", images)


@pytest.fixture(scope="module")
def single(sample_dataset, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-1") / "evaluation.json"
    result = run_hpcgan("evaluate", "--data", sample_dataset, "--samples", samples, "--metrics", ALL, "--out", out,
                        check=True, timeout=240)
    return result, out


def test_table_json_and_worst_pairs(single, sample_dataset, samples):
    result, out = single
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["metric", "value", "real-vs-real", "baseline", "verdict"]
    assert [line.split()[0] for line in lines[2:7]] == ALL.split(",")
    assert "fid: unavailable (no offline Inception weights; pass --fid-weights" in result.stdout
    report = json.loads(out.read_text())
    assert report["generated"] == {"source": "samples", "stacks": 2, "count": 60, "step": 7, "seed": 0}
    assert report["real"] == {"train": 48, "val": 48} and report["image_shape"] == [1, 64, 64]
    mem = report["metrics"]["memorization"]
    assert mem["verdict"] == "memorisation" and mem["value"] == pytest.approx(24 / 60)  # exactly the copies
    assert all(row["generated"] < 24 and row["train"] == row["generated"] for row in mem["worst"])
    assert report["worst_dir"] == "worst-pairs"
    for row in mem["worst"]:
        assert (out.parent / "worst-pairs" / row["png"]).stat().st_size > 0
    # No input path (dataset or samples) reaches the derived file.
    text = out.read_text()
    assert str(sample_dataset) not in text and str(samples) not in text and "/tmp" not in text


@pytest.mark.mpi
@requires_mpirun
def test_two_ranks_give_the_single_process_result(single, sample_dataset, samples, tmp_path):
    _, out1 = single
    out2 = tmp_path / "evaluation.json"
    run_hpcgan_mpi(2, "evaluate", "--data", sample_dataset, "--samples", samples, "--metrics", ALL,
                   "--out", out2, check=True, timeout=240)
    one, two = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert two["world_size"] == 2
    assert two["metrics"] == one["metrics"]  # every value, per level and per pair, bit for bit


@pytest.mark.slow
@pytest.mark.mpi
@requires_mpirun
def test_checkpoint_mode_scores_the_generated_images_on_1_and_2_ranks(sample_dataset, tmp_path):
    import torch

    from hpcgan.checkpoint import CheckpointWriter
    from hpcgan.config import to_dict
    from hpcgan.metrics import evaluate
    from hpcgan.networks import ModelConfig, build_generator
    from hpcgan.sample import generate_images

    torch.manual_seed(0)
    model = ModelConfig(resolution=64, channels=1, latent_dim=16, g_base_width=8, max_width=32)
    writer = CheckpointWriter(tmp_path / "run" / "checkpoints")
    writer.submit({"config": {"model": to_dict(model)}, "step": 5, "G": build_generator(model).state_dict()}, 5)
    writer.close()
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000005.pt"
    out = tmp_path / "evaluation.json"
    run_hpcgan("evaluate", "--data", sample_dataset, "--checkpoint", tmp_path / "run", "--num-images", 20,
               "--metrics", "swd,intensity", "--seed", 3, "--out", out, check=True, timeout=240)
    report = json.loads(out.read_text())
    assert report["generated"]["source"] == "checkpoint" and report["generated"]["count"] == 20
    # Under mpirun rank 0 generates and broadcasts: the same images, the same numbers.
    out2 = tmp_path / "evaluation-2.json"
    run_hpcgan_mpi(2, "evaluate", "--data", sample_dataset, "--checkpoint", tmp_path / "run", "--num-images", 20,
                   "--metrics", "swd,intensity", "--seed", 3, "--out", out2, check=True, timeout=240)
    assert json.loads(out2.read_text())["metrics"] == report["metrics"]
    expected = evaluate(generate_images(ckpt, 20, seed=3), read_slices(sample_dataset, "train", 1000, 3),
                        read_slices(sample_dataset, "val", 1000, 3), metrics=("swd", "intensity"), seed=3)
    assert report["metrics"]["swd"]["value"] == pytest.approx(expected["swd"]["value"], rel=1e-6)
    assert report["metrics"]["intensity"]["value"] == pytest.approx(expected["intensity"]["value"], rel=1e-6)


@pytest.mark.parametrize("case, message", [
    ("no-samples", "no such samples directory"),
    ("empty-samples", "no stack-*.h5 files"),
    ("bad-metric", "--metrics: unknown metric 'ssim'"),
    ("wrong-size", "generated images are (1, 32, 32) but the training images are (1, 64, 64)"),
    ("no-weights-file", "--fid-weights"),
    ("not-a-dataset", "not a dataset"),
    ("mixed-stacks", "stacks of different or non-(N, C, H, W) shapes"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(case, message, sample_dataset, samples, tmp_path):
    data, source, extra = sample_dataset, samples, []
    if case == "no-samples":
        source = tmp_path / "missing"
    elif case == "empty-samples":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "bad-metric":
        extra = ["--metrics", "swd,ssim"]
    elif case == "wrong-size":
        source = write_samples(tmp_path / "small", np.zeros((4, 1, 32, 32), np.float32))
    elif case == "no-weights-file":
        extra = ["--metrics", "fid", "--fid-weights", tmp_path / "inception.pt"]
    elif case == "not-a-dataset":
        data = tmp_path
    elif case == "mixed-stacks":
        source = write_samples(tmp_path / "mixed", np.zeros((4, 1, 64, 64), np.float32))
        write_stack_h5(source / "stack-00001.h5", np.zeros((4, 1, 32, 32), np.float32), {})
    out = tmp_path / "evaluation.json"
    result = run_hpcgan("evaluate", "--data", data, "--samples", source, "--out", out, *extra, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert not out.exists()
