"""HDF5 shards: `images` (N, C, H, W) chunked along N, `subject`, `slice_index`, optional
`masks` (N, H, W), attributes with the normalisation parameters. A shard is written under a
temporary name and renamed when complete (hpcgan.io.atomic_path)."""
import json
import re

import numpy as np

SHARD_PATTERN = re.compile(r"^(train|val)-(\d{5})-of-(\d{5})\.h5$")
SUBJECT_ID_BYTES = 64


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


class ShardWriter:
    """Append whole subjects to an open HDF5 file. Datasets grow along N; the byte layout
    depends only on what is appended, in which order, so any rank writes the same file."""

    def __init__(self, path, channels: int, size: int, dtype: str, mask_dtype: str | None, compression: str,
                 chunk_slices: int, attrs: dict):
        from hpcgan.io import HDF5Output

        self.output = HDF5Output(path, track_order=False)  # a full disk fails cleanly (see HDF5Output)
        self.file = self.output.file
        options = {"compression": None if compression == "none" else compression, "track_times": False}
        if compression == "gzip":
            options["compression_opts"] = 4
        self.images = self.file.create_dataset(
            "images", shape=(0, channels, size, size), maxshape=(None, channels, size, size), dtype=dtype,
            chunks=(chunk_slices, channels, size, size), **options)
        self.masks = None
        if mask_dtype:
            self.masks = self.file.create_dataset(
                "masks", shape=(0, size, size), maxshape=(None, size, size), dtype=mask_dtype,
                chunks=(chunk_slices, size, size), **options)
        self.subject = self.file.create_dataset("subject", shape=(0,), maxshape=(None,),
                                                dtype=f"S{SUBJECT_ID_BYTES}", chunks=(1024,), track_times=False)
        self.slice_index = self.file.create_dataset("slice_index", shape=(0,), maxshape=(None,), dtype=np.int32,
                                                    chunks=(1024,), track_times=False)
        for key, value in attrs.items():
            self.file.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        self.count = 0

    def append(self, subject_id: str, slice_indices, images: np.ndarray, masks=None):
        n = len(slice_indices)
        if n == 0:
            return
        start, stop = self.count, self.count + n
        for dataset in (self.images, self.subject, self.slice_index) + ((self.masks,) if self.masks else ()):
            dataset.resize(stop, axis=0)
        self.images[start:stop] = images
        if self.masks is not None:
            self.masks[start:stop] = masks
        self.subject[start:stop] = np.full(n, subject_id.encode(), dtype=f"S{SUBJECT_ID_BYTES}")
        self.slice_index[start:stop] = np.asarray(slice_indices, dtype=np.int32)
        self.count = stop
        self.output.check()

    def close(self, attrs: dict | None = None):
        for key, value in (attrs or {}).items():
            self.file.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        self.output.close()
