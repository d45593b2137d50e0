"""hpcgan.data: the sampler's rank parts and resume, and the Dataset against plain h5py on a
real preprocessed dataset (the sample_dataset fixture)."""

import pickle

import h5py
import numpy as np
import pytest
import torch

from hpcgan.data import RankSampler, SliceDataset, decode, make_loader, read_slices
from hpcgan.preprocess.manifest import load_manifest
from hpcgan.errors import UsageError
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
