"""The options of `hpcgan preprocess`: each declared once, as a `PreprocessConfig` field with its
help text, checked in `__post_init__`; the command-line flags are generated from the fields.

Sources, later ones winning: the defaults here < a YAML file (--config; keys with dashes or
underscores) < flags given on the command line."""

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from hpcgan.config import build, read_yaml, resolve_config_path
from hpcgan.preprocess import transforms as T


def option(default, help: str, default_help: str | None = None):
    """A field with its flag's help text. `default_help` says what the default means where the
    value would not ("" leaves it unshown); a list default is copied for each config (a
    default_factory, so the `noqa: RUF009` on list fields)."""
    metadata = {"help": help, "default_help": default_help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PreprocessConfig:
    input: str = option("", "input directory (searched recursively) or a quoted glob", default_help="")
    output: str = option("", "dataset directory to write (created if needed)", default_help="")
    modalities: list[str] = option(  # noqa: RUF009
        ["t1"], "comma-separated modalities, stacked as channels in this order"
    )
    mask: str | None = option(None, "modality holding a segmentation/mask, stored as `masks`", default_help="none")
    label_map: str | None = option(
        None,
        "with --mask: source labels to training classes SOURCE=CLASS,..., e.g. 1=1,2=1,4=2 (BraTS: tumour core, "
        "enhancing); *=CLASS maps every other non-zero label; a label outside the map is an error",
        default_help="keep the labels as they are",
    )
    class_names: list[str] = option(  # noqa: RUF009
        [], "with --mask: names of classes 0..K-1 for reports, e.g. background,gm,wm", default_help="class 0..K-1"
    )
    slices: str | None = option(
        None,
        "axial slice range START:STOP after reorientation to RAS, e.g. 60:108",
        default_help="all slices passing --min-brain-fraction",
    )
    min_brain_fraction: float = option(0.1, "keep slices with at least this fraction of non-zero voxels")
    size: int = option(256, "output size in pixels, 32..512, power of two")
    channels: int | None = option(
        None, "output channels: 3 replicates a single modality", default_help="one per modality"
    )
    norm: Literal["percentile", "zscore", "ct-window"] = option("percentile", "intensity normalisation")
    percentiles: list[float] = option(  # noqa: RUF009
        [0.5, 99.5], "LOW,HIGH percentiles of non-zero voxels mapped to -1,+1"
    )
    zscore_clip: float = option(3.0, "z-score: +-this many standard deviations map to +-1")
    ct_level: float = option(40.0, "CT window level in HU")
    ct_width: float = option(80.0, "CT window width in HU")
    volume_index: int | None = option(None, "which volume of 4-D images to use", default_help="refuse 4-D")
    nan_as_background: bool = option(
        False,
        "NaN voxels (outside a resampled volume's field of view) become background: 0 for MRI norms and masks, "
        "the volume's lowest finite value for ct-window (default: refuse volumes with NaN)",
    )
    shards: int = option(
        8,
        "training shards; validation and test get shards x their fraction, at least 1; never more shards than subjects",
    )
    val_fraction: float = option(0.1, "fraction of subjects held out for validation")
    test_fraction: float = option(
        0.0,
        "fraction of subjects held out as a test split (test-*.h5) that training and its evaluation never read; "
        "score it with hpcgan evaluate --split test",
        default_help="0, no test split",
    )
    seed: int = option(0, "seed of the train/val/test split")
    dtype: Literal["float16", "uint8"] = option("float16", "stored pixel type")
    compression: Literal["none", "lzf", "gzip"] = option("none", "HDF5 compression (slows random reads in training)")
    chunk_slices: int = option(32, "HDF5 chunk length along N")
    pseudonymize: bool = option(False, "store salted hashes instead of subject names (needs --salt-file)")
    salt_file: str | None = option(
        None, "private file with the pseudonymisation salt; created if missing", default_help=""
    )
    skip_bad: bool = option(False, "skip bad subjects (listed in the manifest's `skipped`) instead of stopping")
    overwrite: bool = option(False, "replace an existing dataset in --output")

    def __post_init__(self):
        if not self.input:
            raise ValueError("'input' is required (--input DIR_OR_GLOB)")
        if not self.output:
            raise ValueError("'output' is required (--output DATASET_DIR)")
        if not self.modalities:
            raise ValueError("'modalities' needs at least one modality")
        if len(set(self.modalities)) != len(self.modalities) or self.mask in self.modalities:
            raise ValueError("'modalities' and 'mask' must name different modalities")
        if (self.label_map or self.class_names) and not self.mask:
            raise ValueError("'label_map' and 'class_names' need 'mask' (the modality holding the labels)")
        if self.label_map:
            T.parse_label_map(self.label_map)
        if len(set(self.class_names)) != len(self.class_names) or not all(self.class_names):
            raise ValueError(f"'class_names' must be distinct, non-empty names, got {self.class_names}")
        if self.size not in (32, 64, 128, 256, 512):
            raise ValueError(f"'size' must be a power of two from 32 to 512, got {self.size}")
        n = len(self.modalities)
        if self.channels is not None and self.channels != n and not (n == 1 and self.channels == 3):
            raise ValueError(f"'channels' must be {n} (one per modality) or 3 with one modality, got {self.channels}")
        if self.slices is not None:
            T.parse_slice_range(self.slices)
        if not 0.0 <= self.min_brain_fraction < 1.0:
            raise ValueError("'min_brain_fraction' must be in [0, 1)")
        if len(self.percentiles) != 2 or not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError(f"'percentiles' must be two values 0 <= low < high <= 100, got {self.percentiles}")
        if self.zscore_clip <= 0 or self.ct_width <= 0:
            raise ValueError("'zscore_clip' and 'ct_width' must be positive")
        if self.shards < 1 or self.chunk_slices < 1:
            raise ValueError("'shards' and 'chunk_slices' must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"'val_fraction' must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"'test_fraction' must be in [0, 1), got {self.test_fraction}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"'val_fraction' {self.val_fraction} + 'test_fraction' {self.test_fraction} leave no training "
                "subject (their sum must be below 1)"
            )
        if self.volume_index is not None and self.volume_index < 0:
            raise ValueError("'volume_index' must be >= 0")
        if self.pseudonymize and not self.salt_file:
            raise ValueError(
                "'pseudonymize' needs 'salt_file' (--salt-file FILE: a private file holding the salt, "
                "created if missing; keep it outside the dataset)"
            )

    @property
    def num_channels(self) -> int:
        return self.channels or len(self.modalities)


def _flag_type(hint):
    """The argparse type of a field: int and float are parsed by argparse; strings, lists (comma
    lists, split by hpcgan.config.build) and Literals (checked by build, which names the choices)
    stay strings."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return hint if hint in (int, float) else None


def _flag_help(f: dataclasses.Field, hint) -> str:
    text = f.metadata["help"]
    if typing.get_origin(hint) is Literal:
        text += ": " + " | ".join(typing.get_args(hint))
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    shown = f.metadata["default_help"]
    if shown is None and not isinstance(default, bool):
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
    return f"{text} (default: {shown})" if shown else text


def add_arguments(parser):
    """One flag per field (--min-brain-fraction for min_brain_fraction). Defaults are suppressed:
    only flags given on the command line override the YAML file."""
    parser.add_argument("--config", default=None, help="YAML file with any of the keys below (flags override it)")
    hints = typing.get_type_hints(PreprocessConfig)
    for f in dataclasses.fields(PreprocessConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        if hint is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=_flag_help(f, hint))
        else:
            parser.add_argument(flag, type=_flag_type(hint), default=argparse.SUPPRESS, help=_flag_help(f, hint))


def load_preprocess_config(args) -> PreprocessConfig:
    """defaults < YAML file (--config) < flags given on the command line."""
    data, source = {}, "command line"
    if args.config:
        path = resolve_config_path(args.config)
        data, source = {k.replace("-", "_"): v for k, v in read_yaml(path).items()}, os.fspath(path)
    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(PreprocessConfig)}}
    data.update(flags)
    return build(PreprocessConfig, data, source)
