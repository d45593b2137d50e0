"""The real MRI sample data (hpcgan/commands/sample_data.py, the `sample_data` fixture)."""

from pathlib import Path

import nibabel as nib
import numpy as np


def test_sample_data_is_real_brain_mri(sample_data):
    t1 = nib.load(sample_data / "mni152" / "mni152_t1.nii.gz")
    assert t1.shape == (197, 233, 189)
    data = np.asarray(t1.dataobj)
    brain = data > 0
    assert 0.1 < brain.mean() < 0.6  # a skull-stripped brain fills part of the box, not all of it
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
    assert t1.header["descrip"].item() in (b"", "")
    seg = np.asarray(nib.load(sample_data / "mni152" / "mni152_seg.nii.gz").dataobj)
    assert set(np.unique(seg)) == {0, 1, 2} and (seg[~brain] == 0).mean() > 0.99
    if Path("/usr/share/mricron/templates/ch2bet.nii.gz").exists():
        colin = nib.load(sample_data / "colin27" / "colin27_t1.nii.gz")
        assert colin.shape == (181, 217, 181)
