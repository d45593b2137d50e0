"""Joint image + mask synthesis (model.mask_classes) on the shipped sample brains: label sets from
preprocessing, the joint data and networks, a joint model that trains with its masks lined up with its
images, samples with masks in HDF5, NIfTI and PNG, and their evaluation (mask plausibility, the
segmentation task). Bad input: one line, exit 2, nothing written."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SAMPLE_DATASET_OPTIONS, TISSUE, run_hpcgan
from test_train import train_args

from hpcgan.data import SliceDataset, read_slices
from hpcgan.models import build_generator
from hpcgan.models.config import ModelConfig
from hpcgan.models.layers import encode_masks, joint_output, split_joint
from hpcgan.preprocess import transforms as T
from hpcgan.segmentation import (
    SegmentationRecipe,
    dice_per_class,
    mean_foreground_dice,
    predict,
    synthetic_subset,
    train_segmenter,
)
from hpcgan.stacks import read_samples

JOINT_STEPS = 200
TASK_STEPS = 60
TASK = ["--metrics", "swd", "--task", "segmentation", "--budget", str(TASK_STEPS)]
ROLL = (8, 8)  # pixels (rows, columns) by which the control's masks are moved against their images


def preprocess(sample_data, out, *options):
    return run_hpcgan("preprocess", "--input", sample_data, "--output", out, *options, timeout=300)


def assert_usage_error(result, *words):
    """Exit 2 with one line naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# A small DCGAN that draws brain-shaped slices with their tissue masks in 200 steps (about 1.5 min on 2 cores).
JOINT_MODEL = [
    "model.mask_classes=3",
    "model.g_base_width=16",
    "model.d_base_width=16",
    "model.max_width=64",
    "model.latent_dim=32",
    "model.upsample=resize",
    "train.batch_size=8",
    "log.every_steps=50",
]


@pytest.fixture(scope="module")
def joint_run(tissue_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("joint") / "run"
    result = run_hpcgan(*train_args(tissue_dataset, run, JOINT_STEPS, *JOINT_MODEL, config="dcgan-64"), timeout=900)
    assert result.returncode == 0, result.stderr
    return run


# ---------------------------------------------------------------- label sets


def test_label_map_parses_and_remaps():
    mapping = T.parse_label_map("1=1, 2=1, 4=2")
    assert mapping == {1: 1, 2: 1, 4: 2}
    labels = np.array([[0, 1, 2], [4, 4, 0]], dtype=np.uint16)
    classes, missing = T.remap_labels(labels, mapping)
    assert classes.tolist() == [[0, 1, 1], [2, 2, 0]] and missing == []
    classes, missing = T.remap_labels(np.array([0, 3, 7, 1]), {1: 1})
    assert missing == [3, 7]
    classes, missing = T.remap_labels(np.array([0, 3, 7, 1]), T.parse_label_map("1=2,*=1"))
    assert classes.tolist() == [0, 1, 1, 2] and missing == []
    for bad, words in (
        ("1=1,3=3", "without gaps"),
        ("0=1", "background"),
        ("1=1,1=2", "twice"),
        ("x=1", "SOURCE=CLASS"),
        ("1=0", "no label"),
    ):
        with pytest.raises(ValueError, match=words):
            T.parse_label_map(bad)


def test_label_map_on_real_masks_matches_the_source_labels(sample_data, tmp_path):
    """`*=1` turns MNI152's grey/white matter and Colin27's 116 AAL regions into one class: the stored masks
    are exactly the source labels > 0, and the manifest holds the label set."""
    common = ["--modalities", "t1", "--slices", "70:80", "--size", "32", "--shards", "1", "--val-fraction", "0.5"]
    preprocess(sample_data, tmp_path / "raw", *common, "--mask", "seg").check_returncode()
    preprocess(sample_data, tmp_path / "mapped", *common, "--mask", "seg", "--label-map", "*=1").check_returncode()
    manifest = json.loads((tmp_path / "mapped" / "manifest.json").read_text())
    assert manifest["mask_classes"] == 2 and manifest["label_map"] == "*=1"
    assert manifest["class_names"] == ["background", "class 1"] and max(manifest["mask_labels"]) > 2
    raw_manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert raw_manifest["mask_classes"] == max(manifest["mask_labels"]) + 1 and raw_manifest["label_map"] is None
    for split in ("train", "val"):
        _, raw = read_slices(tmp_path / "raw", split, with_masks=True)
        _, mapped = read_slices(tmp_path / "mapped", split, with_masks=True)
        assert raw.max() >= 2 and set(np.unique(mapped)) == {0, 1}
        assert np.array_equal(mapped, (raw > 0).astype(np.int64))


@pytest.mark.parametrize(
    "options, words",
    [
        (["--label-map", "1=1,2=1,200=2,*=1"], ["--label-map", "label 200 is in no subject's mask"]),
        (["--label-map", "1=1,2=2"], ["colin27", "not in --label-map"]),
        (["--label-map", "1=1,2=2,*=3", "--class-names", "bg,gm"], ["--class-names", "2 names for 4 classes"]),
    ],
)
def test_bad_label_sets_are_refused_and_nothing_is_written(sample_data, tmp_path, options, words):
    out = tmp_path / "dataset"
    result = preprocess(sample_data, out, "--modalities", "t1", "--mask", "seg", "--size", "32", *options)
    assert_usage_error(result, *words)
    assert not list(out.glob("*.h5")) and not (out / "manifest.json").exists()


# ---------------------------------------------------------------- the joint data and networks


def test_joint_items_hold_the_stored_mask_one_hot_and_flip_with_the_image(tissue_dataset):
    plain = SliceDataset(tissue_dataset, "train")
    joint = SliceDataset(tissue_dataset, "train", mask_classes=3, flip=True, seed=5)
    images, masks = read_slices(tissue_dataset, "train", with_masks=True)
    assert set(np.unique(masks)) == {0, 1, 2}
    flipped = 0
    for i in range(len(plain)):
        item, _ = joint[(0, i)]
        assert item.shape == (4, 64, 64)
        want_image, want_mask = torch.from_numpy(images[i]), torch.from_numpy(masks[i])
        if joint.flips(i, 0):
            want_image, want_mask, flipped = want_image.flip(-1), want_mask.flip(-1), flipped + 1
        assert torch.equal(item[:1], want_image)
        assert torch.equal(item[1:], encode_masks(want_mask[None], 3)[0])
        assert torch.equal(item[1:].argmax(0), want_mask)
    assert 0 < flipped < len(plain)
    # The real pairs line up: the brain (mask > 0) is where the T1 image is not background.
    assert iou(masks > 0, images[:, 0] > -0.95) > 0.8


def iou(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_joint_output_and_mask_codes():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 8, 8) * 3
    out = joint_output(x, 1)
    assert torch.equal(out[:, :1], torch.tanh(x[:, :1]))
    assert torch.allclose(((out[:, 1:] + 1) / 2).sum(1), torch.ones(5, 8, 8))  # a distribution per pixel
    images, masks = split_joint(out, 1)
    assert torch.equal(masks, x[:, 1:].argmax(1)) and images.shape == (5, 1, 8, 8)
    numpy_images, numpy_masks = split_joint(out.numpy(), 1)
    assert np.array_equal(numpy_masks, masks.numpy()) and numpy_masks.dtype == np.int64
    labels = torch.randint(0, 3, (2, 8, 8))
    assert torch.equal(split_joint(encode_masks(labels, 3), 0)[1], labels)
    G = build_generator(ModelConfig(resolution=32, channels=1, mask_classes=3, g_base_width=8, latent_dim=8))
    assert G(torch.randn(2, 8)).shape == (2, 4, 32, 32)
    with pytest.raises(ValueError, match="model.mask_classes"):
        ModelConfig(mask_classes=1)


def test_a_joint_model_needs_a_dataset_with_its_label_set(sample_data, sample_dataset, tissue_dataset, tmp_path):
    no_masks = tmp_path / "no-masks"
    options = [o for o in SAMPLE_DATASET_OPTIONS if o not in ("--mask", "seg")]
    preprocess(sample_data, no_masks, *options, "--shards", "1").check_returncode()
    cases = [
        (no_masks, 3, ["needs a dataset with masks"]),
        (sample_dataset, 3, ["masks hold labels up to", "--label-map"]),
        (tissue_dataset, 2, ["model.mask_classes=2", "3 classes", "set model.mask_classes=3"]),
    ]
    for dataset, classes, words in cases:
        run = tmp_path / f"run-{classes}-{dataset.parent.name}"
        result = run_hpcgan(*train_args(dataset, run, 2, f"model.mask_classes={classes}"))
        assert_usage_error(result, *words)
        assert not run.exists()


# ---------------------------------------------------------------- a trained joint model


def generated_pairs(run, n=64, seed=0):
    from hpcgan.generation import generate_images, load_generator
    from hpcgan.training.checkpointing import resolve_checkpoint

    G = load_generator(resolve_checkpoint(run))
    return split_joint(generate_images(G, range(n), seed).numpy(), 1)


def class_means(images, masks) -> list:
    """Mean T1 intensity of each tissue class: background, grey matter, white matter."""
    return [float(images[:, 0][masks == k].mean()) for k in range(3)]


def test_a_joint_model_draws_masks_that_line_up_with_its_images(joint_run, tissue_dataset):
    """In T1 the background is dark, grey matter mid-grey, white matter bright. A generated mask's classes
    order the generated image's intensities so, as the real pairs do, and far better than the mask of another
    sample: a model trained on masks shuffled against their images (or flipped without them) fails this."""
    real_images, real_masks = read_slices(tissue_dataset, "train", with_masks=True)
    real = class_means(real_images, real_masks)
    assert real[0] < -0.9 and real[0] < real[1] < real[2], real
    images, masks = generated_pairs(joint_run)
    aligned = class_means(images, masks)
    shuffled = class_means(images, np.roll(masks, 1, axis=0))
    assert aligned[0] < aligned[1] < aligned[2], aligned
    assert aligned[2] - aligned[0] > 0.9, aligned
    assert aligned[2] - aligned[0] > shuffled[2] - shuffled[0] + 0.3, (aligned, shuffled)
    # Every class appears, none takes over the image; the samples differ (no collapse to one pair).
    frequencies = np.bincount(masks.ravel(), minlength=3) / masks.size
    assert frequencies.min() > 0.05 and frequencies.max() < 0.8, frequencies
    assert images[:, 0].std(axis=0).mean() > 0.2


def test_joint_samples_round_trip_through_hdf5_nifti_and_png(joint_run, tmp_path):
    from PIL import Image

    out = tmp_path / "samples"
    result = run_hpcgan("sample", "--checkpoint", joint_run, "--out", out, "--num-stacks", "2", "--stack-size", "10")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["class_names"] == ["background", "grey-matter", "white-matter"]
    assert "stack-00001-mask.nii.gz" in index["files"]
    images, masks = generated_pairs(joint_run, 10, seed=0)
    with h5py.File(out / "stack-00000.h5", "r") as f:
        assert f["images"].shape == (10, 1, 64, 64) and f["masks"].dtype == np.uint8
        assert np.array_equal(f["masks"][...], masks)
        assert np.allclose(f["images"][...], images, atol=1e-5)
    image_volume = nib.load(out / "stack-00000.nii.gz")
    label_volume = nib.load(out / "stack-00000-mask.nii.gz")
    assert label_volume.shape == image_volume.shape == (64, 64, 10)
    assert np.allclose(label_volume.affine, image_volume.affine)
    assert label_volume.get_data_dtype() == np.uint8
    labels = np.asarray(label_volume.dataobj)
    assert np.array_equal(labels[:, ::-1, :].transpose(2, 1, 0), masks)  # the stack's RAS layout, as the image's
    sheet = np.asarray(Image.open(out / "stack-00000.png"))
    assert sheet.shape == (64, 640, 3)
    colours = {tuple(c) for c in sheet.reshape(-1, 3)}
    assert (255, 64, 64) in colours and (64, 255, 64) in colours  # grey and white matter outlined


def test_evaluating_joint_samples_scores_masks_and_the_segmentation_task(
    joint_run, tissue_dataset, tmp_path, report_figure
):
    samples = tmp_path / "samples"
    run_hpcgan("sample", "--checkpoint", joint_run, "--out", samples, "--stack-size", "64").check_returncode()
    out = tmp_path / "evaluation.json"
    result = run_hpcgan("evaluate", "--data", tissue_dataset, "--samples", samples, "--out", out, *TASK, timeout=900)
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(out.read_text())
    assert evaluation["image_shape"] == [1, 64, 64]
    masks, task = evaluation["metrics"]["masks"], evaluation["metrics"]["segmentation"]
    assert masks["value"] is not None and masks["baseline"] is not None
    arms = task["arms"]
    assert set(arms) == {"real", "synthetic", "real+synthetic"}
    assert arms["synthetic"]["train_pairs"] == arms["real"]["train_pairs"] == 48
    assert arms["real"]["mean_dice"] > 0.5, arms["real"]
    # The control: the synthetic arm again, on the same generated images with their masks rolled by ROLL,
    # as `evaluate` trains and scores it (its subsets, recipe and seed). Registered brains teach a mean shape
    # whatever the masks, so an absolute bar proves little; what aligned pairs teach beyond misaligned ones
    # is the alignment.
    images, masks, _ = read_samples(samples, with_masks=True)
    val_images, val_masks = read_slices(tissue_dataset, "val", max_items=1000, seed=0, with_masks=True)
    chosen = synthetic_subset(len(images), arms["real"]["train_pairs"], seed=0)
    rolled = np.roll(masks, ROLL, axis=(1, 2))[chosen]
    unet = train_segmenter(images[chosen], rolled, 3, SegmentationRecipe(seed=0, steps=TASK_STEPS))
    misaligned = mean_foreground_dice(dice_per_class(predict(unet, val_images), val_masks, 3))
    aligned = arms["synthetic"]["mean_dice"]
    report_figure(
        f"joint model, segmentation task ({TASK_STEPS} steps, 64x64): synthetic Dice {aligned:.3f} with its own "
        f"masks, {misaligned:.3f} with them rolled by {ROLL} pixels; real {arms['real']['mean_dice']:.3f}"
    )
    assert aligned > misaligned + 0.15, (aligned, misaligned)
    assert "segmentation" in result.stdout and "masks" in result.stdout
    report = run_hpcgan("report", joint_run, "--evaluation", out, "--out", tmp_path / "report.html")
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert "Dice white-matter" in page and "real+synthetic" in page


def test_evaluate_refuses_masks_it_cannot_use(joint_run, sample_dataset, sample_data, tissue_dataset, tmp_path):
    samples = tmp_path / "samples"
    run_hpcgan("sample", "--checkpoint", joint_run, "--out", samples, "--stack-size", "8").check_returncode()
    binary = tmp_path / "binary"
    common = [o for o in TISSUE if o not in ("--class-names", "background,grey-matter,white-matter")]
    preprocess(sample_data, binary, *common, "--label-map", "*=1").check_returncode()
    image_only = tmp_path / "image-only"
    run_hpcgan("sample", "--checkpoint", joint_run, "--out", image_only, "--stack-size", "8").check_returncode()
    with h5py.File(image_only / "stack-00000.h5", "a") as f:
        del f["masks"]
    cases = [
        (binary, samples, ["outside the dataset's classes 0..1"]),
        (tissue_dataset, image_only, ["--task segmentation", "has no masks"]),
    ]
    for dataset, source, words in cases:
        out = tmp_path / "evaluation.json"
        result = run_hpcgan("evaluate", "--data", dataset, "--samples", source, "--out", out, *TASK)
        assert_usage_error(result, *words)
        assert not out.exists()
    result = run_hpcgan("evaluate", "--data", tissue_dataset, "--samples", samples, "--budget", "5")
    assert_usage_error(result, "--budget", "--task segmentation")


def test_sweep_summary_ranks_runs_by_dice_highest_first(tmp_path, cli_in_process, capsys):
    for name, dice, lr in (("a", 0.41, 1e-4), ("b", 0.67, 2e-4), ("c", None, 1e-3)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"optim:\n  lr: {lr}\n")
        if dice is not None:
            metrics = {"swd": {"value": 10.0}, "segmentation": {"value": dice, "baseline": 0.7}}
            (run / "evaluation.json").write_text(json.dumps({"metrics": metrics}))
    assert cli_in_process(["sweep-summary", *(str(tmp_path / n) for n in "abc"), "--metric", "segmentation"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[:3] for row in rows] == [["1", "b", "0.67"], ["2", "a", "0.41"], ["-", "c", "no"]]


def test_the_latest_and_best_pointers_resolve_to_the_checkpoint_they_name(joint_run, tmp_path):
    from hpcgan.training.checkpointing import resolve_checkpoint
    from hpcgan.errors import UsageError

    checkpoints = joint_run / "checkpoints"
    named = checkpoints / (checkpoints / "latest").read_text().strip()
    assert resolve_checkpoint(checkpoints / "latest") == named == resolve_checkpoint(joint_run)
    stray = tmp_path / "checkpoints"
    stray.mkdir()
    (stray / "best").write_text("../ckpt-00000200.pt\n")
    with pytest.raises(UsageError, match="is not a checkpoint in"):
        resolve_checkpoint(stray / "best")
