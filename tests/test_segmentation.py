"""Train on synthetic, test on real (hpcgan.segmentation) and mask plausibility (hpcgan.metrics.masks).

The real-data tests use the MNI152 slices of the sample dataset (the train split: 48 axial slices with
the grey/white-matter seg, labels 0 background, 1 grey, 2 white; the val split is Colin27, whose seg
is the AAL atlas, another labelling): slices 60-83 train the segmenter, 84-107 score it, at 32x32.
Run as a script (under mpirun) it is the 2-rank side of test_two_ranks_give_the_dice_of_one_process."""

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import requires_mpirun, run_python_mpi
from hpcgan.data import decode, read_slices
from hpcgan.preprocess.manifest import load_manifest
from hpcgan.errors import UsageError
from hpcgan.metrics.masks import compute_mask_plausibility
from hpcgan.parallel.group import ONE_PROCESS, Group, world_group
from hpcgan.segmentation import (
    SegmentationRecipe,
    UNet,
    dice_counts,
    dice_counts_over_ranks,
    dice_per_class,
    mean_foreground_dice,
    predict,
    task_evaluation,
    train_segmenter,
)

K = 3  # background, grey matter, white matter
RECIPE = SegmentationRecipe(widths=(8, 16, 32), steps=40, seed=0)  # a small budget: about 2 s per arm
SHORT = SegmentationRecipe(widths=(8, 16, 32), steps=3, seed=0)


def load_pairs(dataset) -> dict:
    """{"train", "val", "noise"}: (images, masks) pairs at 32x32, read straight from the HDF5 shard.
    Noise pairs: the training images with uniformly random labels, masks with nothing to do with them."""
    manifest = load_manifest(dataset)
    (shard,) = manifest["splits"]["train"]["shards"]
    with h5py.File(Path(dataset) / shard, "r") as f:
        images, masks = decode(f["images"][()]), torch.from_numpy(f["masks"][()].astype(np.int64))
    assert set(np.unique(masks.numpy())) == {0, 1, 2}
    images = torch.nn.functional.avg_pool2d(images, 2).numpy()
    masks = masks[:, ::2, ::2].numpy().copy()  # nearest: labels stay labels
    train, val = (images[:24], masks[:24]), (images[24:], masks[24:])
    noise = (train[0], np.random.default_rng(0).integers(0, K, train[1].shape))
    return {"train": train, "val": val, "noise": noise}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs(sample_dataset):
    return load_pairs(sample_dataset)


@pytest.fixture(scope="module")
def one_process_result(pairs):
    return task_evaluation(pairs["train"], pairs["noise"], pairs["val"], K, RECIPE)


@pytest.fixture(scope="module")
def real_model(pairs):
    return train_segmenter(*pairs["train"], K, RECIPE)


# ---------------------------------------------------------------- pure maths and shapes


def test_dice_per_class_by_hand():
    target = np.array([[[0, 0, 1, 1], [0, 2, 2, 1]]])
    pred = np.array([[[0, 1, 1, 1], [0, 2, 0, 0]]])
    # pixels:    t: 0 0 1 1 0 2 2 1    p: 0 1 1 1 0 2 0 0
    # class 0: A=p==0 {0,4,6,7} (4), B=t==0 {0,1,4} (3), A∩B {0,4} (2) → 4/7
    # class 1: A {1,2,3} (3), B {2,3,7} (3), A∩B {2,3} (2) → 4/6
    # class 2: A {5} (1), B {5,6} (2), A∩B {5} (1) → 2/3
    np.testing.assert_allclose(dice_per_class(pred, target, 3), [4 / 7, 4 / 6, 2 / 3])
    # Absent from both: NaN, left out of the mean; the mean is over the foreground classes only.
    dice = dice_per_class(pred, target, 5)
    assert np.isnan(dice[3:]).all()
    assert mean_foreground_dice(dice) == pytest.approx((4 / 6 + 2 / 3) / 2)
    # Predicted but absent from the truth: defined, 0.
    assert dice_per_class(np.ones((1, 2, 2), int), np.zeros((1, 2, 2), int), 2).tolist() == [0.0, 0.0]
    assert mean_foreground_dice(np.array([0.9, np.nan])) is None
    # Pooled over the set, not a mean of per-image Dice: one big perfect image outweighs a tiny miss.
    big, small = np.ones((1, 10, 10), int), np.zeros((1, 10, 10), int)
    small[0, 0, 0] = 1
    pooled = dice_per_class(np.concatenate([big, 0 * small]), np.concatenate([big, small]), 2)[1]
    assert pooled == pytest.approx(200 / 201)


def test_unet_shapes_and_refuses_a_side_it_cannot_halve():
    torch.manual_seed(0)
    net = UNet(1, 3, (8, 16, 32))
    for side in (64, 256, 32):
        assert net(torch.zeros(1, 1, side, side)).shape == (1, 3, side, side)
    assert UNet(2, 4, (4, 8, 16, 32))(torch.zeros(2, 2, 16, 24)).shape == (2, 4, 16, 24)
    with pytest.raises(UsageError, match="62x64 pixels.*3 levels needs sides divisible by 4"):
        net(torch.zeros(1, 1, 62, 64))
    with pytest.raises(UsageError, match="38x38 pixels.*divisible by 4"):  # refused before any training
        train_segmenter(np.zeros((4, 1, 38, 38), np.float32), np.zeros((4, 38, 38), np.int64), 2, SegmentationRecipe())


def test_recipe_and_inputs_are_checked(pairs):
    with pytest.raises(ValueError, match=r"^segmentation\.batch_size: expected a positive integer"):
        SegmentationRecipe(batch_size=0)
    with pytest.raises(ValueError, match=r"^segmentation\.lr"):
        SegmentationRecipe(lr=float("nan"))
    with pytest.raises(ValueError, match=r"^segmentation\.widths"):
        SegmentationRecipe(widths=())
    assert SegmentationRecipe(widths=[8, 16]).widths == (8, 16)
    assert json.loads(json.dumps(SegmentationRecipe().to_dict()))["widths"] == [16, 32, 64]

    class ThreeRanks(Group):
        world_size = 3

    with pytest.raises(UsageError, match=r"segmentation\.batch_size: 16 is not divisible by the 3 ranks"):
        train_segmenter(*pairs["train"], K, RECIPE, group=ThreeRanks())
    bad = (pairs["val"][0], pairs["val"][1] + 1)  # labels up to 3
    with pytest.raises(UsageError, match=r"^real validation pairs: mask labels 1\.\.3 outside 0\.\.2"):
        task_evaluation(pairs["train"], pairs["noise"], bad, K, RECIPE)
    with pytest.raises(UsageError, match=r"^synthetic pairs: images are \(1, 16, 16\)"):
        half = (pairs["train"][0][:, :, ::2, ::2], pairs["train"][1][:, ::2, ::2])
        task_evaluation(pairs["train"], half, pairs["val"], K)
    with pytest.raises(UsageError, match="num_classes must be at least 2"):
        task_evaluation(pairs["train"], pairs["noise"], pairs["val"], 1, RECIPE)


def test_one_process_group_allreduce_sum_is_a_copy_and_backends_without_it_refuse():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = ONE_PROCESS.allreduce_sum(a)
    assert out is not a and out.dtype == np.float32 and np.array_equal(out, a)
    out[0, 0] = 99
    assert a[0, 0] == 0
    with pytest.raises(TypeError, match="integer or float"):
        ONE_PROCESS.allreduce_sum(np.array(["x"], object))

    class TwoRanksNoAllreduce(Group):  # as the training backends: several ranks, no allreduce_sum
        world_size = 2

    with pytest.raises(NotImplementedError, match="TwoRanksNoAllreduce has no allreduce_sum"):
        TwoRanksNoAllreduce().allreduce_sum(a)


# ---------------------------------------------------------------- on real slices


def test_read_slices_with_masks_returns_what_the_shards_hold(sample_dataset, pairs):
    images, masks = read_slices(sample_dataset, "train", with_masks=True)
    assert images.dtype == np.float32 and masks.dtype == np.int64
    assert images.shape == (48, 1, 64, 64) and masks.shape == (48, 64, 64)
    halved = torch.nn.functional.avg_pool2d(torch.from_numpy(images), 2).numpy()
    assert np.array_equal(halved[:24], pairs["train"][0]) and np.array_equal(masks[:24, ::2, ::2], pairs["train"][1])
    sub_images, sub_masks = read_slices(sample_dataset, "train", max_items=5, seed=1, with_masks=True)
    rows = [int(np.nonzero((images == im).all(axis=(1, 2, 3)))[0][0]) for im in sub_images]
    assert len(set(rows)) == 5 and np.array_equal(sub_masks, masks[rows])


def test_real_pairs_teach_more_than_noise_pairs(pairs, one_process_result, real_model, report_figure):
    result = one_process_result
    json.dumps(result, allow_nan=False)  # JSON-able, no NaN
    arms = result["arms"]
    assert set(arms) == {"real", "synthetic", "real+synthetic"} and result["baseline"] == "real"
    assert [arms[a]["train_pairs"] for a in ("real", "synthetic", "real+synthetic")] == [24, 24, 48]
    real, noise = arms["real"]["mean_dice"], arms["synthetic"]["mean_dice"]
    assert result["value"] == noise and not result["notes"]
    assert real > 0.55 and real > noise + 0.2, result
    assert len(arms["real"]["dice"]) == K
    assert arms["real"]["mean_dice"] == pytest.approx(np.mean(arms["real"]["dice"][1:]))
    # The arm's Dice is that of predict() on the validation slices with the arm's network.
    dice = dice_per_class(predict(real_model, pairs["val"][0], batch_size=7), pairs["val"][1], K)
    np.testing.assert_allclose(dice, arms["real"]["dice"], atol=1e-12)
    report_figure(
        f"segmentation (32x32, {RECIPE.steps} steps): mean foreground Dice real {real:.3f}, noise pairs {noise:.3f}, "
        f"real+noise {arms['real+synthetic']['mean_dice']:.3f}; {result['seconds']:.1f} s for 3 arms"
    )


def test_training_is_repeatable_with_a_seed(pairs):
    recipe = SegmentationRecipe(widths=(8, 16, 32), steps=6, seed=5)
    first, second = (train_segmenter(*pairs["train"], K, recipe).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = train_segmenter(*pairs["train"], K, SegmentationRecipe(widths=(8, 16, 32), steps=6, seed=6)).state_dict()
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_fewer_synthetic_pairs_than_real_are_all_used_and_noted(pairs):
    few = (pairs["noise"][0][:10], pairs["noise"][1][:10])
    result = task_evaluation(pairs["train"], few, pairs["val"], K, SegmentationRecipe(widths=(4, 8), steps=2))
    assert result["arms"]["synthetic"]["train_pairs"] == 10 and result["arms"]["real+synthetic"]["train_pairs"] == 34
    assert result["notes"] == ["only 10 synthetic pairs for 24 real: the synthetic arms use all of them"]


@requires_mpirun
def test_two_ranks_give_the_dice_of_one_process(sample_dataset, pairs, one_process_result, tmp_path):
    run_python_mpi(2, __file__, sample_dataset, tmp_path, timeout=300, check=True)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["result"] == ranks[1]["result"]  # every rank returns the same dict
    two, one = ranks[0]["result"], one_process_result
    assert two["ranks"] == 2 and one["ranks"] == 1
    # The arithmetic: after a few steps both ranks hold the same network, that of one process up to
    # float rounding (a rank trained on its half batch alone is ~1e-3 away: one Adam step of lr).
    rank0, rank1 = (torch.load(tmp_path / f"short-{r}.pt", weights_only=True) for r in (0, 1))
    alone = train_segmenter(*pairs["train"], K, SHORT).state_dict()
    for name, value in alone.items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, atol=1e-5, rtol=0, msg=name)
    # The scoring, as each rank computed it (no broadcast in between): each predicted half of the
    # validation slices, and both hold the counts of the whole set, those of one process with that network.
    net = UNet(1, K, SHORT.widths)
    net.load_state_dict(rank0)
    whole = dice_counts(predict(net, pairs["val"][0]), pairs["val"][1], K).tolist()
    assert ranks[0]["short_counts"] == whole and ranks[1]["short_counts"] == whole
    # The whole budget: Adam amplifies the rounding over 40 steps (measured here: about 1e-3 of Dice on
    # the real arms, 1e-2 on the noise arm, whose random labels leave most pixels near a tie).
    for arm, atol in (("real", 3e-3), ("real+synthetic", 3e-3), ("synthetic", 3e-2)):
        np.testing.assert_allclose(two["arms"][arm]["dice"], one["arms"][arm]["dice"], atol=atol, err_msg=arm)
    # MpiGroup.allreduce_sum: rank r sent (r + 1) * [1, 2, 3] as float64 and as float32.
    assert ranks[0]["allreduce"] == {"float64": [3.0, 6.0, 9.0], "float32": [3.0, 6.0, 9.0]}


def mpi_main(dataset, out):
    """Under mpirun: the task evaluation of the test above on every rank, each writing what it got."""
    group = world_group()
    summed = {
        str(dtype.__name__): group.allreduce_sum(np.arange(1, 4, dtype=dtype) * (group.rank + 1)).tolist()
        for dtype in (np.float64, np.float32)
    }
    p = load_pairs(dataset)
    short = train_segmenter(*p["train"], K, SHORT, group=group)
    torch.save(short.state_dict(), Path(out) / f"short-{group.rank}.pt")
    val = tuple(torch.from_numpy(a) for a in p["val"])
    counts = dice_counts_over_ranks(short, *val, K, group, batch_size=64).tolist()
    result = task_evaluation(p["train"], p["noise"], p["val"], K, RECIPE, group=group)
    mine = {"result": result, "allreduce": summed, "short_counts": counts}
    (Path(out) / f"rank-{group.rank}.json").write_text(json.dumps(mine))


# ---------------------------------------------------------------- mask plausibility


def test_mask_plausibility_of_real_noise_and_missing_masks(pairs):
    train, val = pairs["train"][1], pairs["val"][1]
    itself = compute_mask_plausibility(train, train, K, val)
    json.dumps(itself, allow_nan=False)
    assert itself["value"] == 0.0 and itself["generated"]["class_frequency_l1"] == 0.0
    baseline = itself["baseline"]
    assert 0 < baseline < 2
    rng = np.random.default_rng(0)
    # Each slice's pixels shuffled: the class frequencies stay, the shapes become speckle.
    speckle = np.stack([rng.permutation(m.ravel()).reshape(m.shape) for m in train])
    shuffled = compute_mask_plausibility(speckle, train, K, val)
    assert shuffled["generated"]["class_frequency_l1"] < 1e-12
    assert shuffled["value"] > 5 * baseline and shuffled["baseline"] == baseline
    assert compute_mask_plausibility(pairs["noise"][1], train, K)["value"] > 5 * baseline
    # No foreground at all: far by frequency, components and size.
    empty = compute_mask_plausibility(np.zeros_like(train), train, K, val)
    assert empty["value"] > baseline and empty["generated"]["per_class"]["1"]["components_per_slice"] == 0
    assert compute_mask_plausibility(train, train, K)["baseline"] is None
    with pytest.raises(UsageError, match=r"^generated masks: labels 0\.\.3 outside 0\.\.2"):
        compute_mask_plausibility(train + (train > 1), train, K)
    with pytest.raises(UsageError, match=r"^train masks: expected \(N, H, W\) integer labels"):
        compute_mask_plausibility(train, train.astype(np.float32), K)


if __name__ == "__main__":
    mpi_main(*sys.argv[1:3])
