"""Write real brain MRI volumes that ship inside installed packages, laid out as BraTS is:
one folder per subject, `<subject>_<modality>.nii.gz`. Nothing is downloaded.

  mni152/   ICBM152 2009a nonlinear symmetric template (nilearn): t1 (skull-stripped),
            gm and wm probability maps, seg (0 background, 1 grey matter, 2 white matter,
            the larger of the two probability maps above 0.5), tissue (the same as seg)
  colin27/  Colin27 single-subject T1 (Debian package mricron-data, if installed):
            t1 (brain only, ch2bet), t1head (with skull, ch2), seg (AAL atlas labels 1..116, same space),
            tissue (the common class set of both subjects, approximate: 1 grey matter = any AAL
            region, 2 white matter = brain outside the atlas brighter than the brain's median T1,
            which leaves out the dark CSF; 0 elsewhere)

Every volume is written with a fresh NIfTI header (no free text from the source)."""

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from hpcgan.errors import HpcganError
from hpcgan.io import check_writable_dir, write_bytes_atomic
from hpcgan.log import get_logger

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")

ICBM_NOTE = (
    "ICBM 2009a Nonlinear Symmetric template, Copyright (C) 1993-2009 Louis Collins, McConnell Brain "
    "Imaging Centre, Montreal Neurological Institute, McGill University; free use with this notice "
    "(Fonov et al., NeuroImage 2011); shipped in nilearn (BSD-3-Clause)"
)
COLIN_NOTE = (
    "Colin27 single-subject T1 (Holmes et al., JCAT 1998) and AAL labels (Tzourio-Mazoyer et al., "
    "NeuroImage 2002), from MRIcron's templates in Debian's mricron-data (BSD-style licence)"
)


@dataclass
class Volume:
    subject: str
    modality: str
    source: str
    note: str


def add_arguments(parser):
    parser.add_argument("out", metavar="DIR", help="output directory (created if needed)")
    parser.add_argument("--force", action="store_true", help="rewrite volumes that already exist")


def _nilearn_data_dir() -> Path:
    try:
        import nilearn.datasets
    except ImportError:
        raise HpcganError("nilearn is not installed: pip install nilearn (make setup installs it)") from None
    return Path(nilearn.datasets.__file__).parent / "data"


def _load(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _volumes():
    """Yield (Volume, array, affine) for every volume available on this machine."""
    nl = _nilearn_data_dir()
    icbm = {m: nl / f"mni_icbm152_{m}_tal_nlin_sym_09a_converted.nii.gz" for m in ("t1", "gm", "wm")}
    if not all(p.is_file() for p in icbm.values()):
        raise HpcganError(f"{nl}: nilearn's ICBM152 files are missing; reinstall nilearn")
    arrays = {m: _load(p) for m, p in icbm.items()}
    for modality in ("t1", "gm", "wm"):
        data, affine = arrays[modality]
        yield Volume("mni152", modality, f"nilearn/{icbm[modality].name}", ICBM_NOTE), data, affine
    gm, wm = arrays["gm"][0].astype(np.float32), arrays["wm"][0].astype(np.float32)
    if gm.max() > 1.5:  # stored as 0..255 in some nilearn versions
        gm, wm = gm / 255.0, wm / 255.0
    seg = np.where((gm > 0.5) & (gm >= wm), 1, np.where(wm > 0.5, 2, 0)).astype(np.uint8)
    yield Volume("mni152", "seg", "nilearn gm/wm maps (derived)", ICBM_NOTE), seg, arrays["gm"][1]
    yield Volume("mni152", "tissue", "nilearn gm/wm maps (derived)", ICBM_NOTE), seg, arrays["gm"][1]

    colin = {"t1": "ch2bet.nii.gz", "t1head": "ch2.nii.gz", "seg": "aal.nii.gz"}
    if all((MRICRON_TEMPLATES / f).is_file() for f in colin.values()):
        loaded = {}
        for modality, name in colin.items():
            loaded[modality] = data, affine = _load(MRICRON_TEMPLATES / name)
            yield Volume("colin27", modality, f"mricron-data/{name}", COLIN_NOTE), data, affine
        (t1, affine), aal = loaded["t1"], loaded["seg"][0]
        yield (
            Volume("colin27", "tissue", "mricron-data t1 and aal (derived)", COLIN_NOTE),
            colin_tissue(t1, aal),
            affine,
        )
    else:
        get_logger().warning("Colin27 skipped: Debian's mricron-data is not installed (apt-get install mricron-data)")


def colin_tissue(t1: np.ndarray, aal: np.ndarray) -> np.ndarray:
    """Colin27 in the MNI152 seg's classes (see the module docstring); t1 and aal share one grid."""
    brain = t1 > 0
    bright = t1 > np.median(t1[brain])
    return np.where(aal > 0, 1, np.where(brain & bright, 2, 0)).astype(np.uint8)


def write_sample_data(out) -> list[tuple]:
    """Write every available volume under `out` (bytes unchanged are not rewritten); returns
    (Volume, path, shape, dtype) for each."""
    out = Path(check_writable_dir(out))
    written = []
    for volume, data, affine in _volumes():
        path = out / volume.subject / f"{volume.subject}_{volume.modality}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(np.asarray(data), affine)  # fresh header: no source free text
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        # Same bytes on every run (gzip without a timestamp), so a dataset built from them stays valid.
        payload = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
        if not (path.exists() and path.read_bytes() == payload):
            write_bytes_atomic(path, payload)
        written.append((volume, path, data.shape, data.dtype))
    return written


def run(args):
    log = get_logger()
    written = write_sample_data(args.out)
    notes = {}
    for volume, path, shape, dtype in written:
        shape_text = "x".join(map(str, shape))
        print(f"{os.path.relpath(path, args.out):32s} {shape_text:12s} {str(dtype):8s} from {volume.source}")
        notes.setdefault(volume.subject, volume.note)
    print("Licences:")
    for subject, note in notes.items():
        print(f"  {subject}: {note}")
    log.info("wrote %d volumes of %d subjects to %s", len(written), len(notes), args.out)
