"""Reading a preprocessed dataset (`hpcgan preprocess`) for training and evaluation.

`SliceDataset` reads single slices from the HDF5 shards, opening files lazily in each worker
process; `RankSampler` gives rank r of n a disjoint part of an epoch's permutation, the same
number of batches on every rank; `make_loader` puts the two together in a `SliceLoader` (a worker's
failure is one line); `read_slices` loads a deterministic subset for evaluation.
"""

import bisect
import os
import re

import h5py
import numpy as np
import torch

from hpcgan.errors import HpcganError, UsageError
from hpcgan.models.layers import encode_masks
from hpcgan.preprocess.manifest import load_manifest
from hpcgan.preprocess.transforms import MAX_MASK_CLASSES

LABELS = ("none", "mask")


def decode(stored: np.ndarray) -> torch.Tensor:
    """Stored shard pixels → float32 tensor in [-1, 1], the inverse of
    `hpcgan.preprocess.transforms.encode`. In torch: its float16 → float32 conversion is
    vectorised, numpy's is a scalar loop (several times slower than reading the bytes)."""
    tensor = torch.from_numpy(stored)
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).div_(127.5).sub_(1.0)
    return tensor.to(torch.float32)


def _split_shards(manifest: dict, dataset_dir, split: str):
    if split not in manifest["splits"]:
        raise UsageError(f"{dataset_dir}: no split {split!r} (have: {', '.join(manifest['splits'])})")
    counts = {s["name"]: s["slices"] for s in manifest["shards"]}
    names = [n for n in manifest["splits"][split]["shards"] if counts[n] > 0]
    return names, [counts[n] for n in names]


class SliceDataset(torch.utils.data.Dataset):
    """Item i → (image float32 (C, H, W) in [-1, 1], label int64). Labels: "none" → 0;
    "mask" → 1 if the slice's mask has any non-zero voxel. With `mask_classes` K (a joint image + mask
    model) the image is followed by its mask's K one-hot channels in {-1, +1} (C + K channels).
    Horizontal flip with p=0.5, drawn from (seed, epoch, index) so a run is reproducible: the epoch comes
    with the index ((epoch, index), make_loader's EpochTagged), or for a plain index from `set_epoch`."""

    def __init__(
        self,
        dataset_dir,
        split: str = "train",
        flip: bool = False,
        labels: str = "none",
        seed: int = 0,
        mask_classes: int = 0,
    ):
        self.dataset_dir = os.fspath(dataset_dir)
        self.manifest = load_manifest(dataset_dir)
        if labels not in LABELS:
            raise UsageError(f"labels: expected one of {', '.join(LABELS)}, got {labels!r}")
        if labels == "mask" and not self.manifest["has_masks"]:
            raise UsageError(f"{dataset_dir}: labels='mask' needs a dataset preprocessed with --mask")
        if mask_classes:
            check_mask_classes(self.manifest, dataset_dir, mask_classes)
        self.split, self.flip, self.labels, self.seed, self.epoch = split, flip, labels, seed, 0
        self.mask_classes = mask_classes
        self.num_classes = 2 if labels == "mask" else 1
        self.shard_names, counts = _split_shards(self.manifest, dataset_dir, split)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._starts = [int(n) for n in self.offsets]
        self._label_tensors = (torch.tensor(0, dtype=torch.int64), torch.tensor(1, dtype=torch.int64))
        self._files, self._datasets, self._pid = {}, {}, None  # opened lazily, per process

    def __len__(self):
        return int(self.offsets[-1])

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def locate(self, index: int):
        """Global index → (shard name, row in that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        shard = bisect.bisect_right(self._starts, index) - 1  # plain ints: faster than numpy per item
        return self.shard_names[shard], index - self._starts[shard]

    def _file(self, name):
        if self._pid != os.getpid():  # a forked worker must not reuse the parent's handles
            self._files, self._datasets, self._pid = {}, {}, os.getpid()
        if name not in self._files:
            self._files[name] = h5py.File(os.path.join(self.dataset_dir, name), "r")
        return self._files[name]

    def _dataset(self, name, key):
        """An open HDF5 dataset, kept: looking one up by name costs more than reading a slice."""
        if self._pid != os.getpid() or (name, key) not in self._datasets:
            self._datasets[(name, key)] = self._file(name)[key]
        return self._datasets[(name, key)]

    def flips(self, index: int, epoch: int | None = None) -> bool:
        epoch = self.epoch if epoch is None else epoch
        return bool(np.random.default_rng([self.seed, epoch, index]).random() < 0.5)

    def __getitem__(self, index):
        """`index` (flipped for the epoch of `set_epoch`), or (epoch, index) as make_loader's sampler
        yields them: its persistent workers hold copies of the dataset made at their start."""
        epoch, index = (int(index[0]), int(index[1])) if isinstance(index, tuple) else (None, int(index))
        name, row = self.locate(index)
        try:
            image = decode(self._dataset(name, "images")[row])
            # One read of the slice's mask serves the class label and joint mode alike.
            stored = self._dataset(name, "masks")[row] if self.labels == "mask" or self.mask_classes else None
            label = int(stored.any()) if self.labels == "mask" else 0
            if self.mask_classes:  # joint mode: the mask's one-hot channels follow the image's
                mask = torch.from_numpy(stored.astype(np.int64))
                if int(mask.max()) >= self.mask_classes:
                    raise HpcganError(
                        f"{os.path.join(self.dataset_dir, name)}: mask {row} holds class {int(mask.max())}, "
                        f"outside the dataset's classes 0..{self.mask_classes - 1}"
                    )
                image = torch.cat([image, encode_masks(mask[None], self.mask_classes)[0]])
        except OSError as exc:  # h5py: a damaged chunk or a shard cut short
            raise self.unreadable(name, f"image {row}", exc) from exc
        if self.flip and self.flips(index, epoch):
            image = image.flip(-1)
        return image, self._label_tensors[label].clone()

    def unreadable(self, name: str, what: str, exc: OSError) -> HpcganError:
        """The one-line error for `what` of shard `name` that h5py could not read."""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return HpcganError(
            f"{os.path.join(self.dataset_dir, name)}: {what} is unreadable ({reason}); "
            f"`hpcgan info {self.dataset_dir} --verify` checks every shard"
        )

    def __getstate__(self):  # never pickle open HDF5 handles into DataLoader workers
        state = dict(self.__dict__)
        state["_files"], state["_datasets"], state["_pid"] = {}, {}, None
        return state

    def close(self):
        for f in self._files.values():
            f.close()
        self._files, self._datasets = {}, {}


def check_mask_classes(manifest: dict, dataset_dir, mask_classes: int):
    """A joint image + mask model (model.mask_classes = K) needs a dataset with masks whose label set has
    exactly K classes; UsageError naming the dataset otherwise."""
    if not manifest.get("has_masks"):
        raise UsageError(
            f"{dataset_dir}: model.mask_classes={mask_classes} (joint image + mask) needs a dataset with masks: "
            "preprocess with --mask (and --label-map)"
        )
    have = manifest.get("mask_classes")
    if have is None:
        raise UsageError(f"{dataset_dir}: the manifest has no label set (mask_classes); preprocess it again")
    if have > MAX_MASK_CLASSES:
        raise UsageError(
            f"{dataset_dir}: its masks hold labels up to {have - 1}: map them to a few classes with "
            f"hpcgan preprocess --label-map (at most {MAX_MASK_CLASSES})"
        )
    if have != mask_classes:
        raise UsageError(
            f"{dataset_dir}: model.mask_classes={mask_classes} but the dataset's masks have {have} classes "
            f"({', '.join(manifest.get('class_names') or [])}): set model.mask_classes={have}"
        )


class RankSampler(torch.utils.data.Sampler):
    """Rank r's indices of epoch e: the permutation of (seed, e) cut into global batches of
    batch_size × world_size; rank r takes the r-th batch_size block of each global batch. So
    the union over ranks is the single-process stream, and every rank yields exactly
    batches_per_epoch × batch_size indices (the remainder is dropped so step counts match)."""

    def __init__(
        self,
        num_items: int,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ):
        global_batch = batch_size * world_size
        if num_items < global_batch:
            raise UsageError(
                f"dataset has {num_items} slices, fewer than one global batch "
                f"(batch size {batch_size} x {world_size} ranks = {global_batch})"
            )
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.batches_per_epoch = num_items // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Start epoch `epoch`, skipping its first `start_batch` batches (exact resume)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise UsageError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = epoch, start_batch

    def permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)

    def __iter__(self):
        order = self.permutation()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            first = b * global_batch + self.rank * self.batch_size
            yield from (int(i) for i in order[first : first + self.batch_size])

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class EpochTagged(torch.utils.data.Sampler):
    """`sampler`'s indices as (epoch, index): the epoch travels with each index to the dataset, also
    to persistent workers' copies of it, so no epoch has to be pushed into the dataset."""

    def __init__(self, sampler: RankSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


# How torch re-raises a worker's exception in the loading process: its type, built from this header and the
# worker's whole traceback, the exception's own "module.Type: message" line last.
WORKER_FAILURE = re.compile(r"Caught \w+ in DataLoader worker process (\d+)\.\nOriginal Traceback")


def worker_failure_line(exc: BaseException) -> str | None:
    """The one line to show for a DataLoader worker's exception as torch re-raises it (None for any other
    exception): an HpcganError's own message (it names the shard and the reason), else the worker's number and
    the exception's last line. The whole traceback stays in the exception, shown with --debug."""
    header = WORKER_FAILURE.match(str(exc))
    if header is None:
        return None
    last = str(exc).rstrip().splitlines()[-1]
    _, sep, message = last.partition(": ")
    if isinstance(exc, HpcganError) and sep:
        return message
    return f"DataLoader worker {header[1]}: {last}"


class _OneLineWorkerFailures:
    """An iterator over a DataLoader's batches that re-raises a worker's failure as one line (the same
    HpcganError type, or HpcganError), chained to torch's multi-line exception."""

    def __init__(self, batches):
        self._batches = batches

    def __iter__(self):
        return self

    def __len__(self):
        return len(self._batches)

    def __next__(self):
        try:
            return next(self._batches)
        except StopIteration:
            raise
        except Exception as exc:
            line = worker_failure_line(exc)
            if line is None:
                raise
            raise (type(exc) if isinstance(exc, HpcganError) else HpcganError)(line) from exc


class SliceLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers' failures reach the user as one line, like the loading process's own."""

    def __iter__(self):
        return _OneLineWorkerFailures(super().__iter__())


def make_loader(
    dataset_dir,
    split,
    batch_size,
    rank,
    world_size,
    seed,
    flip=False,
    labels="none",
    num_workers=0,
    pin_memory=False,
    mask_classes=0,
):
    """(DataLoader, RankSampler) for rank `rank` of `world_size`. Call
    `sampler.set_epoch(epoch, start_batch)` before iterating each epoch. `pin_memory` when the batches
    go to a GPU: the copy can then overlap compute (non_blocking)."""
    dataset = SliceDataset(dataset_dir, split, flip=flip, labels=labels, seed=seed, mask_classes=mask_classes)
    sampler = RankSampler(len(dataset), rank, world_size, batch_size, seed=seed)
    workers = {}
    if num_workers > 0:
        # Persistent: the workers (and their open HDF5 files) live through the run instead of starting again
        # every epoch. Started by forkserver, not fork: a fork of a rank that has initialised MPI, NCCL or
        # CUDA inherits their threads and locks (Horovod advises it with InfiniBand).
        workers = {"persistent_workers": True, "multiprocessing_context": "forkserver"}
    # A private generator for the loader's worker base seed: iter(loader) then draws nothing from the
    # global torch RNG, so the training's random stream does not depend on num_workers or on epochs.
    loader = SliceLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochTagged(sampler),
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        **workers,
    )
    return loader, sampler


def read_slices(dataset_dir, split, max_items=None, seed=0, with_masks=False):
    """(N, C, H, W) float32 in [-1, 1] of a split, for evaluation. With max_items, a
    deterministic subset chosen from `seed` (read in shard order). With `with_masks`, (images, masks
    (N, H, W) int64) of a dataset preprocessed with --mask."""
    dataset = SliceDataset(dataset_dir, split)
    if with_masks and not dataset.manifest["has_masks"]:
        raise UsageError(f"{dataset_dir}: no masks (preprocess it with --mask)")
    n = len(dataset)
    if max_items is not None and max_items < n:
        indices = np.sort(np.random.default_rng(seed).choice(n, size=max_items, replace=False))
    else:
        indices = np.arange(n)
    out = np.empty((len(indices), *dataset.manifest["image_shape"]), dtype=np.float32)
    masks = np.empty((len(indices), *out.shape[2:]), dtype=np.int64) if with_masks else None
    # Group by shard so each shard is opened once and read with one sorted fancy index.
    shard_of = np.searchsorted(dataset.offsets, indices, side="right") - 1
    try:
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            rows = indices[where] - dataset.offsets[shard]
            name = dataset.shard_names[shard]
            try:
                out[where] = decode(dataset._dataset(name, "images")[rows]).numpy()
                if with_masks:
                    masks[where] = dataset._dataset(name, "masks")[rows]
            except OSError as exc:
                raise dataset.unreadable(name, f"image {int(rows[0])}", exc) from exc
    finally:
        dataset.close()
    return (out, masks) if with_masks else out
