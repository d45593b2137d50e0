"""`hpcgan evaluate` end to end on real slices: the table and JSON, the same numbers on 1, 2 and 3
ranks (real mpirun) with every rank doing part of every metric, the --checkpoint path, --max-real and
--worst-dir, and one-line refusals of bad input."""

import json
import math

import numpy as np
import pytest
import torch

from hpcgan.data import read_slices
from hpcgan.metrics import fid, intensity, memorization, msssim, swd
from hpcgan.stacks import write_stack_h5
from conftest import mpi_env, requires_mpirun, run_hpcgan, run_hpcgan_mpi

ALL = "swd,msssim,intensity,memorization,fid"
NUM_GENERATED = 600
NUM_COPIES = 240
# docs/sampling-and-evaluation.md: any number of ranks gives the single-process numbers to this relative tolerance.
RANK_TOLERANCE = 1e-6


def write_samples(directory, images, stack_size=100):
    """A sample directory as `hpcgan sample` writes it: stack-*.h5 of (N, C, H, W) float32."""
    directory.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(images), stack_size)):
        write_stack_h5(directory / f"stack-{k:05d}.h5", images[start : start + stack_size], {"step": 7, "seed": 0})
    return directory


@pytest.fixture(scope="module")
def samples(sample_dataset, tmp_path_factory):
    """600 images, enough for several chunks of every metric on each of 3 ranks: 240 memorised
    training slices (5 copies of each, shifted a pixel, plus noise) and 360 new images (validation
    slices upside down, plus noise)."""
    train, val = read_slices(sample_dataset, "train"), read_slices(sample_dataset, "val")
    rng = np.random.default_rng(0)
    copies = np.roll(np.tile(train, (NUM_COPIES // len(train), 1, 1, 1)), 1, axis=3)
    new = np.tile(val[:, :, ::-1], (8, 1, 1, 1))[: NUM_GENERATED - NUM_COPIES]
    images = np.concatenate([copies, new])
    images = np.clip(images + rng.normal(0, 0.02, images.shape), -1, 1).astype(np.float32)
    return write_samples(tmp_path_factory.mktemp("samples") / "samples", images)


def evaluate_args(sample_dataset, samples, fid_weights, out):
    return [
        "evaluate",
        "--data",
        sample_dataset,
        "--samples",
        samples,
        "--metrics",
        ALL,
        "--fid-weights",
        fid_weights,
        "--out",
        out,
    ]


@pytest.fixture(scope="module")
def single(sample_dataset, samples, fid_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-1") / "evaluation.json"
    result = run_hpcgan(*evaluate_args(sample_dataset, samples, fid_weights, out), check=True, timeout=300)
    return result, out


def test_table_json_and_worst_pairs(single, sample_dataset, samples):
    from PIL import Image

    result, out = single
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["metric", "value", "real-vs-real", "baseline", "verdict"]
    assert [line.split()[0] for line in lines[2:7]] == ALL.split(",")
    report = json.loads(out.read_text())
    assert report["generated"] == {"source": "samples", "stacks": 6, "count": NUM_GENERATED, "step": 7, "seed": 0}
    assert report["real"] == {"train": 48, "val": 48} and report["image_shape"] == [1, 64, 64]
    mem = report["metrics"]["memorization"]
    assert mem["verdict"] == "memorisation" and mem["value"] == pytest.approx(NUM_COPIES / NUM_GENERATED)
    assert all(row["generated"] < NUM_COPIES and row["train"] == row["generated"] % 48 for row in mem["worst"])
    assert report["worst_dir"] == "worst-pairs"
    for row in mem["worst"]:
        with Image.open(out.parent / "worst-pairs" / row["png"]) as im:
            assert im.size == (2 * 64, 64)
    assert report["metrics"]["fid"]["extractor"] == "--fid-weights" and report["metrics"]["fid"]["value"] > 0
    # No input path (dataset, samples or extractor) reaches the derived file.
    text = out.read_text()
    assert str(sample_dataset) not in text and str(samples) not in text and "/tmp" not in text


def assert_same_numbers(one, many, path="metrics"):
    """Every number of `many` equals the one in `one` to RANK_TOLERANCE; everything else exactly."""
    if isinstance(one, dict):
        assert one.keys() == many.keys(), path
        for key in one:
            assert_same_numbers(one[key], many[key], f"{path}.{key}")
    elif isinstance(one, list):
        assert len(one) == len(many), path
        for i, (a, b) in enumerate(zip(one, many)):
            assert_same_numbers(a, b, f"{path}[{i}]")
    elif isinstance(one, float):
        assert many == pytest.approx(one, rel=RANK_TOLERANCE, abs=0), path
    else:
        assert many == one, path


def chunks_per_metric(num_images):
    """How many units of work (chunks of images or of image pairs) each metric splits across ranks."""
    return {
        "swd patches": math.ceil(num_images / swd.IMAGES_PER_UNIT),
        "swd projections": 3 * swd.DIR_REPEATS,  # 3 pyramid levels at 64 px
        "msssim pairs": math.ceil(msssim.NUM_PAIRS / msssim.PAIRS_PER_UNIT),
        "intensity": math.ceil(num_images / intensity.IMAGES_PER_UNIT),
        "memorization": math.ceil(num_images / memorization.IMAGES_PER_UNIT),
        "fid": math.ceil(num_images / fid.IMAGES_PER_UNIT),
    }


@pytest.mark.mpi
@requires_mpirun
@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_any_number_of_ranks_gives_the_single_process_numbers(
    ranks, single, sample_dataset, samples, fid_weights, tmp_path
):
    chunks = chunks_per_metric(NUM_GENERATED)
    assert min(chunks.values()) >= 3 * ranks, chunks  # every rank computes part of every metric
    _, out1 = single
    out = tmp_path / "evaluation.json"
    run_hpcgan_mpi(ranks, *evaluate_args(sample_dataset, samples, fid_weights, out), check=True, timeout=300)
    one, many = json.loads(out1.read_text()), json.loads(out.read_text())
    assert many["world_size"] == ranks and one["world_size"] == 1
    assert_same_numbers(one["metrics"], many["metrics"])  # every value, per level and per pair


@pytest.mark.slow
@pytest.mark.mpi
@requires_mpirun
def test_checkpoint_mode_scores_the_generated_images_on_1_and_2_ranks(sample_dataset, tmp_path):
    import torch

    from hpcgan.training.checkpointing import CheckpointWriter
    from hpcgan.config import to_dict
    from hpcgan.metrics import evaluate
    from hpcgan.models import build_generator
    from hpcgan.models.config import ModelConfig
    from hpcgan.generation import generate_images, load_generator

    torch.manual_seed(0)
    model = ModelConfig(resolution=64, channels=1, latent_dim=16, g_base_width=8, max_width=32)
    writer = CheckpointWriter(tmp_path / "run" / "checkpoints")
    writer.submit({"config": {"model": to_dict(model)}, "step": 5, "G": build_generator(model).state_dict()}, 5)
    writer.close()
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000005.pt"
    # --max-real 20: a fixed random subset of 20 of the 48 slices of each split; --worst-dir: the pairs' PNGs there.
    args = [
        "evaluate",
        "--data",
        sample_dataset,
        "--checkpoint",
        tmp_path / "run",
        "--num-images",
        20,
        "--metrics",
        "swd,intensity,memorization",
        "--seed",
        3,
        "--max-real",
        20,
    ]
    out = tmp_path / "evaluation.json"
    run_hpcgan(*args, "--out", out, "--worst-dir", tmp_path / "worst", check=True, timeout=240)
    report = json.loads(out.read_text())
    assert report["generated"]["source"] == "checkpoint" and report["generated"]["count"] == 20
    assert report["real"] == {"train": 20, "val": 20}
    assert report["worst_dir"] == "worst" and not (tmp_path / "worst-pairs").exists()
    assert sorted(p.name for p in (tmp_path / "worst").iterdir()) == sorted(
        row["png"] for row in report["metrics"]["memorization"]["worst"]
    )
    # Under mpirun rank 0 generates and broadcasts: the same images, the same numbers.
    out2 = tmp_path / "evaluation-2.json"
    run_hpcgan_mpi(2, *args, "--out", out2, check=True, timeout=240)
    assert json.loads(out2.read_text())["metrics"] == report["metrics"]
    images = generate_images(load_generator(ckpt), range(20), 0).numpy()  # the run's image set (train.seed 0)
    expected = evaluate(
        images,
        read_slices(sample_dataset, "train", 20, 3),
        read_slices(sample_dataset, "val", 20, 3),
        metrics=("swd", "intensity", "memorization"),
        seed=3,
    )
    for metric in ("swd", "intensity", "memorization"):
        for key in ("value", "baseline"):
            assert report["metrics"][metric][key] == pytest.approx(expected[metric][key], rel=1e-6), (metric, key)
    # The whole split gives other baselines: the subset was used.
    full = evaluate(
        images, read_slices(sample_dataset, "train"), read_slices(sample_dataset, "val"), metrics=("intensity",), seed=3
    )
    assert full["intensity"]["baseline"] != pytest.approx(report["metrics"]["intensity"]["baseline"], rel=1e-3)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-samples", "no such samples directory"),
        ("empty-samples", "no stack-*.h5 files"),
        ("bad-metric", "--metrics: unknown metric 'ssim'"),
        ("wrong-size", "generated images are (1, 32, 32) but the training images are (1, 64, 64)"),
        ("no-weights-file", "--fid-weights"),
        ("not-a-dataset", "not a dataset"),
        ("mixed-stacks", "stacks of different or non-(N, C, H, W) shapes"),
    ],
)
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="proves the refusals of a machine without CUDA")
@pytest.mark.parametrize(
    "device, environ, message",
    [
        ("cuda", {}, "--device cuda: torch sees no CUDA device on this node"),
        # auto is the training rule: GPUs that Slurm allocated but torch cannot use are refused, not ignored.
        ("auto", {"SLURM_GPUS_ON_NODE": "1"}, "--device auto: Slurm allocated GPUs (SLURM_GPUS_ON_NODE=1)"),
    ],
)
def test_task_device_follows_the_training_rule(device, environ, message, sample_dataset, samples, tmp_path):
    """--device of the segmentation task is hpcgan.parallel.backend.pick_device's, checked before any work."""
    out = tmp_path / "evaluation.json"
    args = ["evaluate", "--data", sample_dataset, "--samples", samples, "--task", "segmentation", "--out", out]
    result = run_hpcgan(*args, "--device", device, env=mpi_env(environ), timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()
