"""hpcgan.data: the sampler's rank parts and resume, the Dataset against plain h5py on a
real preprocessed dataset (the sample_dataset fixture), and a loader worker's failure as one line."""

import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import run_hpcgan

from hpcgan.data import RankSampler, SliceDataset, decode, make_loader, read_slices
from hpcgan.preprocess.manifest import load_manifest
from hpcgan.errors import HpcganError, UsageError
from hpcgan.preprocess import transforms as T


def epoch_parts(num_items, world_size, batch_size, epoch=0, seed=0, start_batch=0):
    parts = []
    for rank in range(world_size):
        sampler = RankSampler(num_items, rank, world_size, batch_size, seed=seed)
        sampler.set_epoch(epoch, start_batch)
        parts.append(list(sampler))
        assert len(parts[-1]) == len(sampler)
    return parts


def test_rank_parts_are_disjoint_equal_and_cover_the_epoch():
    parts = epoch_parts(103, world_size=4, batch_size=5)
    sampler = RankSampler(103, 0, 4, 5)
    assert sampler.batches_per_epoch == 5
    assert all(len(p) == 5 * 5 for p in parts)  # same step count on every rank; the remainder dropped
    union = [i for p in parts for i in p]
    assert len(set(union)) == len(union) == 100
    # The union over ranks is the single-process permutation's first part.
    single = epoch_parts(103, world_size=1, batch_size=20)[0]
    assert set(union) == set(single)
    # Global batch b of 4 ranks = batch b of one process with batch size 4 x 5.
    for b in range(5):
        global_batch = [i for p in parts for i in p[b * 5 : (b + 1) * 5]]
        assert global_batch == single[b * 20 : (b + 1) * 20]


def test_epochs_reshuffle_and_seed_reproduces():
    a, b = epoch_parts(64, 2, 8, epoch=0), epoch_parts(64, 2, 8, epoch=1)
    assert a != b and sorted(sum(a, [])) == sorted(sum(b, []))
    assert epoch_parts(64, 2, 8, epoch=1) == b
    assert epoch_parts(64, 2, 8, epoch=1, seed=7) != b
    unshuffled = RankSampler(10, 1, 2, 2, shuffle=False)
    assert list(unshuffled) == [2, 3, 6, 7]


def test_start_batch_resumes_exactly_inside_an_epoch():
    full = epoch_parts(90, 3, 4, epoch=5)
    resumed = epoch_parts(90, 3, 4, epoch=5, start_batch=3)
    for f, r in zip(full, resumed):
        assert r == f[3 * 4 :]


def test_dataset_smaller_than_a_global_batch_is_a_usage_error():
    with pytest.raises(UsageError, match="fewer than one global batch"):
        RankSampler(15, 0, 2, 8)


def test_torch_decode_equals_the_numpy_definition():
    stored = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    assert decode(stored).numpy().tobytes() == T.decode(stored).tobytes()
    halves = np.linspace(-1, 1, 999).astype(np.float16)
    assert decode(halves).numpy().tobytes() == T.decode(halves).tobytes()


def test_dataset_returns_the_bytes_h5py_reads(sample_dataset):
    dataset = SliceDataset(sample_dataset, "train", labels="mask")
    manifest = load_manifest(sample_dataset)
    assert len(dataset) == manifest["splits"]["train"]["slices"] == 48 and dataset.num_classes == 2
    with h5py.File(sample_dataset / manifest["splits"]["train"]["shards"][0], "r") as f:
        stored, masks = f["images"][()], f["masks"][()]
    for i in (0, 17, 47):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and tuple(image.shape) == (1, 64, 64)
        assert image.numpy().tobytes() == stored[i].astype(np.float32).tobytes()
        assert label.dtype == torch.int64 and int(label) == int(masks[i].any())
    assert SliceDataset(sample_dataset, "val")[0][1].item() == 0  # labels="none"
    assert SliceDataset(sample_dataset, "val").num_classes == 1
    # Handles are opened lazily and never pickled.
    assert dataset._files and not pickle.loads(pickle.dumps(dataset))._files


def test_flip_is_horizontal_and_reproducible(sample_dataset):
    plain, flipping = SliceDataset(sample_dataset), SliceDataset(sample_dataset, flip=True, seed=3)
    decisions = {}
    for epoch in (0, 1):
        flipping.set_epoch(epoch)
        for i in range(48):
            decisions[epoch, i] = flipping.flips(i)
            expected = plain[i][0].flip(-1) if decisions[epoch, i] else plain[i][0]
            assert torch.equal(flipping[i][0], expected)
    assert 20 < sum(decisions.values()) < 76  # p = 0.5 over 96 draws
    assert any(decisions[0, i] != decisions[1, i] for i in range(48))  # epochs differ
    again = SliceDataset(sample_dataset, flip=True, seed=3)
    again.set_epoch(1)
    assert all(again.flips(i) == decisions[1, i] for i in range(48))
    # The sample MNI brain is nearly symmetric; the colin27 val subject shows the flip is real.
    val, val_flip = SliceDataset(sample_dataset, "val"), SliceDataset(sample_dataset, "val", flip=True)
    i = next(i for i in range(48) if val_flip.flips(i))
    assert not torch.equal(val_flip[i][0], val[i][0]) and torch.equal(val_flip[i][0], val[i][0].flip(-1))


def test_loader_with_workers_yields_the_sampler_order(sample_dataset):
    loader, sampler = make_loader(sample_dataset, "train", batch_size=8, rank=1, world_size=2, seed=0, num_workers=2)
    sampler.set_epoch(2, start_batch=1)
    batches = [x for x, _ in loader]
    assert len(batches) == sampler.batches_per_epoch - 1 == 2
    plain = SliceDataset(sample_dataset)
    expected = torch.stack([plain[i][0] for i in sampler])
    assert torch.equal(torch.cat(batches), expected)


def test_read_slices_is_a_deterministic_subset(sample_dataset):
    everything = read_slices(sample_dataset, "val")
    assert everything.shape == (48, 1, 64, 64) and everything.dtype == np.float32
    subset = read_slices(sample_dataset, "val", max_items=10, seed=1)
    assert np.array_equal(subset, read_slices(sample_dataset, "val", max_items=10, seed=1))
    rows = {everything[i].tobytes() for i in range(48)}
    assert all(s.tobytes() in rows for s in subset)


def test_load_manifest_refuses_what_is_not_a_dataset(tmp_path):
    with pytest.raises(UsageError, match="not a dataset"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(UsageError, match="not an hpcgan dataset"):
        load_manifest(tmp_path)
    with pytest.raises(UsageError, match="no such dataset"):
        load_manifest(tmp_path / "missing")


def _cut_short(path):
    """A shard cut short (a full disk, a copy killed): h5py cannot open it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_worker_failure_is_one_line_naming_the_shard(sample_dataset, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(sample_dataset, dataset)
    (shard,) = load_manifest(dataset)["splits"]["train"]["shards"]
    _cut_short(dataset / shard)
    loader, sampler = make_loader(dataset, "train", batch_size=8, rank=0, world_size=1, seed=0, num_workers=1)
    sampler.set_epoch(0)
    with pytest.raises(HpcganError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{dataset / shard}: image ") and "unreadable" in message
    assert "DataLoader worker process" in str(caught.value.__cause__)  # torch's whole text, for --debug


@pytest.mark.parametrize("debug", [False, True])
def test_train_ends_with_one_line_when_a_worker_cannot_read_a_shard(sample_dataset, tmp_path, debug):
    dataset = tmp_path / "dataset"
    shutil.copytree(sample_dataset, dataset)
    (shard,) = load_manifest(dataset)["splits"]["train"]["shards"]
    _cut_short(dataset / shard)  # after `hpcgan train`'s start checks, which read the manifest only
    overrides = ["train.steps=2", "train.batch_size=4", "train.num_workers=1", "eval.every_steps=0"]
    overrides += ["model.g_base_width=8", "model.d_base_width=8", "model.max_width=32", "log.tensorboard=false"]
    args = ["train", "--config", "wgan-gp-64", "--data", dataset, "--out", tmp_path / "run"]
    result = run_hpcgan(*args, *(x for o in overrides for x in ("--set", o)), *(["--debug"] if debug else []))
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"hpcgan train: error: {errors[0].split('error: ', 1)[1]}"], result.stderr[-3000:]
    assert f"{dataset / shard}: image " in errors[0] and "unreadable" in errors[0]
    # The worker's traceback only with --debug.
    assert ("Original Traceback" in result.stderr) == debug and ("Traceback" in result.stderr) == debug
