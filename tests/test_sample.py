"""Image stacks (hpcgan.stacks) and the `hpcgan sample` command (hpcgan.sample)."""
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from hpcgan.preprocess import transforms as T
from hpcgan.stacks import (contact_sheet, read_stack_attrs, read_stack_h5, to_uint8, write_png, write_stack_h5,
                           write_stack_nifti)


# ---------------------------------------------------------------- stacks: pure maths


def test_to_uint8_matches_the_preprocessing_encoding():
    images = np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0], dtype=np.float32).reshape(1, 1, 2, 3)
    out = to_uint8(images)
    assert out.shape == (1, 2, 3, 1) and out.dtype == np.uint8
    assert out.ravel().tolist() == T.encode(images, "uint8").ravel().tolist() == [0, 0, 128, 191, 255, 255]


@pytest.mark.parametrize("channels", [1, 3])
def test_contact_sheet_places_image_i_at_row_i_div_nrow(channels):
    n, h, w, nrow = 7, 3, 2, 3
    values = np.linspace(-1, 1, n, dtype=np.float32)
    images = np.broadcast_to(values[:, None, None, None], (n, channels, h, w)).copy()
    images[:, -1] *= -1  # RGB: the blue channel differs from red
    sheet = contact_sheet(images, nrow=nrow)
    assert sheet.shape == ((3 * h, nrow * w) if channels == 1 else (3 * h, nrow * w, 3))
    pixels = to_uint8(images)
    for i in range(n):
        r, c = divmod(i, nrow)
        cell = sheet[r * h:(r + 1) * h, c * w:(c + 1) * w]
        assert np.array_equal(cell, pixels[i][..., 0] if channels == 1 else pixels[i])
    assert not sheet[2 * h:, 1 * w:].any()  # the two cells after the last image stay black


def test_png_and_h5_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(4, 3, 8, 8)).astype(np.float32)
    sheet = contact_sheet(images, nrow=2)
    write_png(sheet, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), sheet)
    attrs = {"checkpoint_sha256": "ab" * 32, "seed": 3, "stack_index": 1, "config": {"model": {"resolution": 8}}}
    write_stack_h5(tmp_path / "s.h5", images, attrs)
    assert np.array_equal(read_stack_h5(tmp_path / "s.h5"), images)
    got = read_stack_attrs(tmp_path / "s.h5")
    assert got["seed"] == 3 and got["stack_index"] == 1 and got["checkpoint_sha256"] == "ab" * 32
    assert json.loads(got["config"]) == attrs["config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5", "s.png"]  # no temp files


def test_nifti_zooms_axes_header_and_intensity(tmp_path):
    # rows 0.5 mm (along Y), columns 0.8 mm (along X), 3 mm slices; 2 channels = 2 modalities
    images = np.full((5, 2, 4, 6), -1.0, dtype=np.float32)
    images[:, 0, 0, -1] = 1.0  # top right of the display: anterior (+Y), subject's right side (+X)
    intensity = {"norm": "percentile", "lo": 10.0, "hi": 110.0,
                 "per_modality": {"t1": {"lo": 10.0, "hi": 110.0}, "flair": {"lo": 0.0, "hi": 50.0}}}
    write_stack_nifti(tmp_path / "v.nii.gz", images, [0.5, 0.8], 3.0, intensity, all_channels=True)
    img = nib.load(tmp_path / "v.nii.gz")
    assert img.shape == (6, 4, 5, 2)
    assert img.header.get_zooms()[:3] == (0.8, 0.5, 3.0)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    for key in ("descrip", "aux_file", "intent_name", "db_name"):
        assert img.header[key].tobytes().strip(b"\0") == b""
    data = img.get_fdata(dtype=np.float32)
    assert img.get_data_dtype() == np.float32
    assert data[-1, -1, 0, 0] == 110.0  # top right of the image = max X (right), max Y (anterior)
    assert data[0, 0, 0, 0] == 10.0 and np.all(data[..., 1] == 0.0)
    write_stack_nifti(tmp_path / "first.nii.gz", images, [0.5, 0.8], 3.0, (10.0, 110.0))
    assert nib.load(tmp_path / "first.nii.gz").shape == (6, 4, 5)


def test_nifti_of_real_brain_slices_matches_the_preprocessed_volume(tmp_path, sample_data):
    """Slices made the way preprocessing makes them go back to the same RAS voxels."""
    src = nib.load(sample_data / "mni152" / "mni152_t1.nii.gz")
    volume, affine = T.reorient_to_ras(np.asarray(src.dataobj), src.affine)
    slab = volume[:, :, 80:90].astype(np.float32)
    lo, hi = T.percentile_range(slab, 1, 99)
    images = T.axial_to_image(T.scale_to_unit(slab, lo, hi))[:, None]  # (S, 1, H, W)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    write_stack_nifti(tmp_path / "brain.nii.gz", images, [spacing[1], spacing[0]], spacing[2], (lo, hi))
    out = nib.load(tmp_path / "brain.nii.gz")
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    assert np.allclose(out.header.get_zooms(), spacing)
    np.testing.assert_allclose(out.get_fdata(), np.clip(slab, lo, hi), atol=1e-4 * (hi - lo))
