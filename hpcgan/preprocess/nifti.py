"""Finding NIfTI volumes, and reading them with every check a cohort needs.

Files are named `<subject>_<modality>.nii[.gz]`, in one folder per subject (BraTS) or all in one
folder, or picked by a glob; symlinked folders are followed. A bad volume raises `BadInput` with a
reason that names the file by the label its caller gives (its base name, or its role such as "t1
volume" when names are pseudonymised): input paths never reach logs, shards or the manifest.
"""

import fnmatch
import hashlib
import os
import zlib
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from hpcgan.errors import UsageError
from hpcgan.io import sha256_file
from hpcgan.preprocess import transforms as T

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class BadInput(UsageError):
    """A bad input volume or subject (exit 2); `--skip-bad` turns it into a `skipped` entry."""

    def __init__(self, subject: str, reason: str):
        super().__init__(f"subject {subject}: {reason}")
        self.subject = subject
        self.reason = reason


@dataclass
class Subject:
    name: str  # folder/file stem: the id used unless --pseudonymize
    files: dict = field(default_factory=dict)  # modality -> path
    duplicates: dict = field(default_factory=dict)  # modality -> further paths (a bad subject)


def nifti_stem(path: str):
    """'a/b/x_t1.nii.gz' → 'x_t1'; None when the name is not a NIfTI name."""
    name = os.path.basename(path)
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


GLOB_CHARACTERS = "*?["


def walk_directories(top: str):
    """(directory, file names) of `top` and every folder below it, following symlinked folders
    (a shared copy of a cohort is often linked in, one link per subject). A folder reached a
    second time (a symlink loop, or two links to one folder) is not entered again."""
    seen = set()
    for root, dirs, files in os.walk(top, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        yield root, sorted(files)


def expand_glob(pattern: str) -> list:
    """Paths matching a glob, `**` matching any number of folders. Unlike `glob.glob`, `**`
    follows symlinked folders without looping (glob's `**` follows a link to a parent until the
    path is too long: exponential time with two such links); like it, wildcards do not match
    names starting with '.'."""
    absolute = pattern.startswith(os.sep)
    parts = [p for p in pattern.split(os.sep) if p]
    matches = []

    def expand(base, index):
        if index == len(parts):
            matches.append(base)
            return
        part = parts[index]
        if part == "**":
            for directory, _ in walk_directories(base):
                expand(directory, index + 1)
        elif any(c in part for c in GLOB_CHARACTERS):
            try:
                names = sorted(os.listdir(base))
            except OSError:
                return
            for name in names:
                if fnmatch.fnmatchcase(name, part) and (part.startswith(".") or not name.startswith(".")):
                    expand(os.path.join(base, name), index + 1)
        elif os.path.lexists(os.path.join(base, part)):
            expand(os.path.join(base, part), index + 1)

    expand(os.sep if absolute else os.curdir, 0)
    here = os.curdir + os.sep
    return [m[len(here) :] if not absolute and m.startswith(here) else m for m in matches]


def list_input_files(input_spec: str) -> list:
    """NIfTI files under a directory (recursively), or matching a glob (folders it matches are
    searched recursively); sorted. Symlinked folders are followed; a file reached by two paths
    counts once."""
    if any(c in input_spec for c in GLOB_CHARACTERS):
        found = expand_glob(input_spec)
    elif os.path.exists(input_spec):
        found = [input_spec]
    else:
        raise UsageError("--input: no such file or directory (nor a glob with * ? [)")
    paths = []
    for path in found:
        if os.path.isdir(path):
            paths += [os.path.join(root, name) for root, names in walk_directories(path) for name in names]
        else:
            paths.append(path)
    unique = {}
    for path in sorted(p for p in paths if os.path.isfile(p) and nifti_stem(p) is not None):
        unique.setdefault(os.path.realpath(path), path)
    return sorted(unique.values())


def group_by_subject(paths, wanted_modalities) -> dict:
    """{subject: Subject} from names `<subject>_<modality>`; files of other modalities are
    ignored. The longest matching modality suffix wins (t1ce before t1). A second file for a
    modality is kept in `duplicates` for the caller to report under the subject's id."""
    by_length = sorted(set(wanted_modalities), key=len, reverse=True)
    subjects = {}
    for path in paths:
        stem = nifti_stem(path)
        modality = next((m for m in by_length if stem.endswith("_" + m) and len(stem) > len(m) + 1), None)
        if modality is None:
            continue
        name = stem[: -len(modality) - 1]
        subject = subjects.setdefault(name, Subject(name))
        if modality in subject.files:
            subject.duplicates.setdefault(modality, []).append(path)
        else:
            subject.files[modality] = path
    return dict(sorted(subjects.items()))


@dataclass
class Header:
    shape: tuple  # spatial shape (3 axes)
    affine: np.ndarray
    volumes: int  # length of the 4th axis (1 for 3-D)
    byte_labels: bool  # unscaled 8-bit integers: labels fit in uint8


def read_header(subject: str, path: str, name: str, volume_index=None) -> Header:
    """Open a NIfTI header (no voxel data) and check it describes one 3-D volume. `name` is how
    messages name the file."""
    if os.path.getsize(path) == 0:
        raise BadInput(subject, f"{name}: empty file")
    try:
        image = nib.load(path)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise nib.filebasedimages.ImageFileError("not NIfTI")
    except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise BadInput(subject, f"{name}: not a readable NIfTI file ({_short(exc, path)})") from None
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) <= 1:
        raise BadInput(subject, f"{name}: a 2-D image (shape {'x'.join(map(str, shape))}); need a 3-D volume")
    if len(shape) > 4:
        raise BadInput(subject, f"{name}: a {len(shape)}-D image; need a 3-D volume")
    volumes = shape[3] if len(shape) == 4 else 1
    if volumes > 1 and volume_index is None:
        raise BadInput(subject, f"{name}: a 4-D image with {volumes} volumes; pick one with --volume-index")
    if volume_index is not None and not 0 <= volume_index < volumes:
        raise BadInput(subject, f"{name}: --volume-index {volume_index} out of range (it has {volumes} volumes)")
    affine = image.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadInput(subject, f"{name}: invalid affine (not finite or singular)")
    slope, inter = image.header.get_slope_inter()
    byte_labels = (
        image.get_data_dtype().kind in "iu"
        and image.get_data_dtype().itemsize == 1
        and slope in (None, 1.0)
        and inter in (None, 0.0)
    )
    return Header(shape[:3], np.asarray(affine, dtype=np.float64), volumes, byte_labels)


def check_same_grid(subject: str, headers: dict):
    """All modalities (and the mask) of one subject must share shape and affine."""
    items = list(headers.items())
    first_mod, first = items[0]
    for modality, header in items[1:]:
        if header.shape != first.shape:
            raise BadInput(
                subject,
                f"{modality} has shape {'x'.join(map(str, header.shape))} but {first_mod} has "
                f"{'x'.join(map(str, first.shape))}",
            )
        if not np.allclose(header.affine, first.affine, atol=1e-3):
            raise BadInput(subject, f"{modality} and {first_mod} have different affines (not in the same space)")


def gunzip(data: bytes) -> bytes:
    """Decompress every gzip member in C (zlib checks each member's CRC itself)."""
    parts = []
    while data:
        stream = zlib.decompressobj(31)
        parts.append(stream.decompress(data))
        if not stream.eof:
            raise EOFError("compressed data ended before the end of the gzip stream")
        data = stream.unused_data.lstrip(b"\0")
    return b"".join(parts)


def read_voxels(path: str):
    """(voxels with scale slope/intercept applied, affine, sha256 of the file). A .nii.gz is
    read once, hashed, decompressed in C and its voxels used in place (much faster than
    nibabel's streaming read, and no second copy); a .nii is memory-mapped."""
    if not path.endswith(".gz"):
        image = nib.load(path)
        return np.asanyarray(image.dataobj), image.affine, sha256_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    raw = gunzip(raw)
    header_size = int.from_bytes(raw[:4], "little")
    klass = nib.Nifti2Image if header_size in (540, 540 << 24) else nib.Nifti1Image
    image = klass.from_bytes(raw)  # parses the header; its voxels are used in place below
    proxy = image.dataobj  # knows offset, dtype, shape, order and scaling (moved out of the header)
    voxels = np.frombuffer(raw, dtype=proxy.dtype, count=int(np.prod(proxy.shape)), offset=int(proxy.offset))
    voxels = voxels.reshape(proxy.shape, order=proxy.order)
    return apply_read_scaling(voxels, proxy.slope, proxy.inter), image.affine, digest


def load_volume(
    subject: str,
    path: str,
    name: str,
    volume_index=None,
    allow_all_zero=False,
    nan_as_background=False,
    zero_is_background=True,
):
    """(voxel data, affine, sha256 of the file), the data with scale slope/intercept applied and
    checked for readability, Inf, NaN (refused, or with `nan_as_background` made background as
    `transforms.nan_to_background` says for `zero_is_background`) and (unless `allow_all_zero`, as for
    an empty lesion mask) all-zero content. The array keeps the file's dtype when no scaling is needed;
    it may be read-only. `name` is how messages name the file."""
    try:
        data, affine, digest = read_voxels(path)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise BadInput(subject, f"{name}: truncated or corrupt data ({_short(exc, path)})") from None
    if data.ndim > 3:
        data = data.reshape(data.shape[:3] + (-1,), order="A")[..., volume_index or 0]  # a view, no copy
    if data.dtype.kind not in "uif":
        raise BadInput(subject, f"{name}: unsupported voxel type {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        if np.isinf(data).any():
            raise BadInput(subject, f"{name}: contains Inf voxels")
        if not nan_as_background:
            raise BadInput(
                subject,
                f"{name}: contains NaN voxels ({np.count_nonzero(np.isnan(data))}; outside a resampled field of "
                "view? --nan-as-background makes them background)",
            )
        data = T.nan_to_background(data, zero_is_background)
    if not allow_all_zero and not data.any():
        raise BadInput(subject, f"{name}: all voxels are zero")
    return data, np.asarray(affine, dtype=np.float64), digest


def _short(exc, path: str) -> str:
    """An exception as a short phrase without any path or the file's name in it."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    stem = nifti_stem(path) or os.path.basename(path)
    for token in text.split():
        if os.sep in token or stem in token:
            text = text.replace(token, "<file>")
    return text[:120]
