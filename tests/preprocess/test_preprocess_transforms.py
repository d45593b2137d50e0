"""Pure array functions of hpcgan.preprocess.transforms (maths only; real volumes are in
test_preprocess.py)."""

import nibabel as nib
import numpy as np
import pytest

from hpcgan.preprocess import transforms as T


def test_resize_weights_are_a_normalised_non_negative_filter():
    for n_in, n_out in ((233, 64), (64, 256), (100, 100), (7, 3)):
        w = T.resize_weights(n_in, n_out)
        assert w.shape == (n_out, n_in)
        assert (w >= 0).all()
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)


NO_PAD = ((0, 0), (0, 0))


def naive_pad_and_resize(images, padding, size):
    """The plain definition that pad_and_resize computes faster: pad with -1, then one dense
    matrix product per axis."""
    padded = np.pad(images, ((0, 0), *padding), constant_values=-1.0)
    rows, cols = T.resize_weights(padded.shape[1], size), T.resize_weights(padded.shape[2], size)
    return np.clip(rows @ padded @ cols.T, -1.0, 1.0)


def test_pad_and_resize_equals_padding_then_dense_resize():
    rng = np.random.default_rng(0)
    images = np.full((3, 90, 70), -1.0, dtype=np.float32)
    images[:, 20:75, 10:50] = rng.uniform(-1, 1, size=(3, 55, 40))  # a foreground blob
    for padding, size in ((((0, 0), (10, 10)), 64), (((3, 4), (0, 1)), 128), (NO_PAD, 32)):
        fast = T.pad_and_resize(images, padding, size)
        np.testing.assert_allclose(fast, naive_pad_and_resize(images, padding, size), atol=2e-6)
    assert (T.pad_and_resize(np.full((2, 9, 9), -1.0, np.float32), NO_PAD, 32) == -1.0).all()


def test_a_slice_resizes_to_the_same_bytes_alone_or_in_any_block():
    """Each slice's foreground box differs, so a block is cropped differently from its slices;
    the bytes must not change (the resize of a subject goes block by block)."""
    rng = np.random.default_rng(5)
    images = np.full((6, 300, 240), -1.0, dtype=np.float32)
    for k in range(6):
        top, left = rng.integers(0, 100, size=2)
        images[k, top : top + 150, left : left + 120] = rng.uniform(-1, 1, size=(150, 120))
    padding = ((10, 11), (40, 40))
    for size in (64, 512):
        block = T.pad_and_resize(images, padding, size)
        alone = np.concatenate([T.pad_and_resize(images[k : k + 1], padding, size) for k in range(6)])
        assert block.tobytes() == alone.tobytes(), size


def test_resize_keeps_constants_and_antialiases_a_checkerboard():
    flat = np.full((2, 90, 120), 0.25, dtype=np.float32)
    np.testing.assert_allclose(T.pad_and_resize(flat, NO_PAD, 32), 0.25, atol=1e-6)
    # A 1-pixel checkerboard shrunk 4x must average to grey; point sampling would alias to ±1.
    checker = (np.indices((128, 128)).sum(axis=0) % 2 * 2.0 - 1.0).astype(np.float32)[None]
    assert np.abs(T.pad_and_resize(checker, NO_PAD, 32)).max() < 0.05


def test_resize_of_a_bar_stays_centred():
    image = np.full((1, 100, 100), -1.0, dtype=np.float32)
    image[0, 40:60, :] = 1.0  # a horizontal bar across the middle
    profile = T.pad_and_resize(image, NO_PAD, 50)[0].mean(axis=1) + 1.0
    assert abs((profile * np.arange(50)).sum() / profile.sum() - 24.5) < 1e-3


def test_pad_and_resize_labels_is_nearest_neighbour_of_the_padded_map():
    labels = np.random.default_rng(0).integers(0, 5, size=(3, 37, 53)).astype(np.uint16)
    padding = ((8, 8), (0, 0))
    out = T.pad_and_resize_labels(labels, padding, 64)
    padded = np.pad(labels, ((0, 0), *padding))
    rows = ((np.arange(64) + 0.5) * padded.shape[1] / 64).astype(int)
    cols = ((np.arange(64) + 0.5) * padded.shape[2] / 64).astype(int)
    np.testing.assert_array_equal(out, padded[:, rows[:, None], cols[None, :]])
    np.testing.assert_array_equal(T.pad_and_resize_labels(labels[:, :, :37], NO_PAD, 37), labels[:, :, :37])


def test_square_fov_padding_makes_anisotropic_slices_cover_the_same_millimetres():
    # 100 rows of 1 mm and 50 columns of 2 mm: already 100 x 100 mm, nothing to add.
    assert T.square_fov_padding(100, 50, (1.0, 2.0), 100.0) == ((0, 0), (0, 0))
    # 80 x 100 mm slice in a 120 mm field of view.
    (top, bottom), (left, right) = T.square_fov_padding(80, 50, (1.0, 2.0), 120.0)
    assert (top + bottom + 80) * 1.0 == 120 and (left + right + 50) * 2.0 == 120
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1


def test_reorient_to_ras_matches_nibabel_closest_canonical():
    rng = np.random.default_rng(1)
    data = rng.random((6, 7, 8)).astype(np.float32)
    # An LPS-like affine with axes permuted (what DICOM converters often produce).
    affine = np.array([[0, 0, -2.0, 10], [-1.0, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]])
    ras, ras_affine = T.reorient_to_ras(data, affine)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    np.testing.assert_array_equal(ras, canonical.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(ras_affine, canonical.affine)
    shape, spacing = T.ras_shape_and_spacing(data.shape, affine)
    assert shape == ras.shape and np.allclose(spacing, np.sqrt((ras_affine[:3, :3] ** 2).sum(0)))


def test_axial_to_image_puts_anterior_at_the_top():
    slab = np.zeros((4, 5, 1), dtype=np.float32)  # X (left→right), Y (posterior→anterior), S
    slab[3, 4, 0] = 1.0  # the most right and most anterior voxel
    image = T.axial_to_image(slab)
    assert image.shape == (1, 5, 4) and image[0, 0, 3] == 1.0


def test_percentile_and_zscore_ranges_ignore_zero_background():
    volume = np.zeros((10, 10, 10), dtype=np.int16)
    volume[2:8, 2:8, 2:8] = np.arange(216).reshape(6, 6, 6) + 100
    lo, hi = T.percentile_range(volume, 0.0, 100.0)
    assert (lo, hi) == (100.0, 315.0)
    values = volume[volume != 0].astype(np.float64)
    lo, hi = T.zscore_range(volume, 2.0)
    assert np.isclose(lo, values.mean() - 2 * values.std()) and np.isclose(hi, values.mean() + 2 * values.std())
    assert T.ct_window_range(40.0, 80.0) == (0.0, 80.0)


def test_histogram_percentiles_equal_numpy_for_8_and_16_bit_volumes():
    rng = np.random.default_rng(3)
    for dtype, low, high in ((np.uint8, 0, 256), (np.int16, -1200, 3000), (np.uint16, 0, 60000), (np.int8, -128, 128)):
        volume = rng.integers(low, high, size=(30, 20, 17)).astype(dtype)
        volume[:5] = 0
        expected = np.percentile(volume[volume != 0], [0.5, 99.5])
        np.testing.assert_allclose(T.percentile_range(volume, 0.5, 99.5), expected, rtol=1e-12)


def test_normalise_by_lookup_table_equals_arithmetic():
    rng = np.random.default_rng(4)
    for dtype in (np.uint8, np.int16, np.float32):
        volume = rng.integers(-50 if dtype != np.uint8 else 0, 200, size=(6, 7, 8)).astype(dtype)
        view = T.axial_view(volume)  # strided, as in preprocessing
        for zero_is_background in (True, False):
            expected = T.scale_to_unit(view, 10.0, 150.0, (view == 0) if zero_is_background else None)
            np.testing.assert_array_equal(T.normalise(view, 10.0, 150.0, zero_is_background), expected)


def test_scale_to_unit_maps_range_clips_and_sets_background():
    values = np.array([0, 50, 100, 150, 250], dtype=np.uint8)
    out = T.scale_to_unit(values, 50.0, 150.0, background=values == 0)
    np.testing.assert_allclose(out, [-1.0, -1.0, 0.0, 1.0, 1.0])
    assert out.dtype == np.float32


def test_select_slices_by_range_and_fraction():
    volume = np.zeros((4, 5, 3), dtype=np.int16)
    volume[:2, :, 1] = 7
    np.testing.assert_allclose(T.foreground_fraction(volume), [0.0, 0.5, 0.0])
    np.testing.assert_allclose(T.foreground_fraction(volume, threshold=8), [0.0, 0.0, 0.0])
    fractions = np.array([0.0, 0.05, 0.2, 0.5, 0.3, 0.0])
    assert T.select_slices(fractions).tolist() == [0, 1, 2, 3, 4, 5]
    assert T.select_slices(fractions, None, 0.1).tolist() == [2, 3, 4]
    assert T.select_slices(fractions, (3, 100), 0.1).tolist() == [3, 4]
    assert T.parse_slice_range("60:108") == (60, 108)
    for bad in ("60", "108:60", "a:b"):
        with pytest.raises(ValueError):
            T.parse_slice_range(bad)


def test_uint8_encoding_round_trips_within_half_a_step():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    stored = T.encode(x, "uint8")
    assert stored.dtype == np.uint8 and stored[0] == 0 and stored[-1] == 255
    assert np.abs(T.decode(stored) - x).max() <= 0.5 / 127.5 + 1e-6
    assert np.abs(T.decode(T.encode(x, "float16")) - x).max() < 1e-3


def test_replicate_channels():
    images = np.random.default_rng(2).random((2, 1, 4, 4)).astype(np.float32)
    out = T.replicate_channels(images, 3)
    assert out.shape == (2, 3, 4, 4) and all((out[:, c] == images[:, 0]).all() for c in range(3))


def test_nan_becomes_the_background_of_the_normalisation_that_follows():
    volume = np.array([[np.nan, 3.0], [-2.0, 0.0]], dtype=np.float32)
    volume.flags.writeable = False  # as voxels read in place from a file are
    mri = T.nan_to_background(volume)  # zero is MRI's background (left out of the percentiles, mapped to -1)
    ct = T.nan_to_background(volume, zero_is_background=False)  # CT: the lowest value (air), below any window
    assert mri.tolist() == [[0.0, 3.0], [-2.0, 0.0]] and ct.tolist() == [[-2.0, 3.0], [-2.0, 0.0]]
    assert mri.dtype == ct.dtype == np.float32 and np.isnan(volume[0, 0])  # the input is left alone
    assert T.normalise(mri, 1.0, 3.0, True)[0, 0] == -1.0 and T.normalise(ct, 1.0, 3.0, False)[0, 0] == -1.0
    finite, labels = np.ones((2, 2), np.float32), np.ones((2, 2), np.uint8)
    assert T.nan_to_background(finite) is finite and T.nan_to_background(labels) is labels
    assert T.nan_to_background(np.full(3, np.nan), zero_is_background=False).tolist() == [0.0] * 3
