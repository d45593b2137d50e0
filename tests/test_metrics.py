"""The metrics on real brain slices (the `sample_dataset` fixture: MNI152 in train, Colin27 in val):
each must separate real-like sets from broken ones, in the right order. Plus the pure maths."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcgan.data import read_slices
from hpcgan.metrics import METRICS, evaluate, fid, intensity, memorization, msssim, swd


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # 2 cores shared by many test processes: one BLAS thread is several times faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def slices(sample_dataset):
    return read_slices(sample_dataset, "train"), read_slices(sample_dataset, "val")


def gaussian_blur(images, sigma):
    size = int(4 * sigma) | 1
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(1, 1, size, size)
    x = F.pad(torch.from_numpy(images), (size // 2,) * 4, mode="replicate")
    return F.conv2d(x, kernel).numpy()


def brighten(images, delta):
    """Shift intensities inside the brain only (the background stays -1)."""
    return np.where(images > intensity.BACKGROUND, np.clip(images + delta, -1, 1), images).astype(np.float32)


def shifted_noisy_copies(images, seed=0):
    """Each image moved by up to 2 pixels (np.roll) plus Gaussian noise σ 0.02: near-copies."""
    rng = np.random.default_rng(seed)
    moved = np.stack([np.roll(x, tuple(rng.integers(-2, 3, size=2)), axis=(1, 2)) for x in images])
    return np.clip(moved + rng.normal(0, 0.02, moved.shape), -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def perturbed(slices):
    train, val = slices
    rng = np.random.default_rng(1)
    sets = {"val": val, "blur1": gaussian_blur(val, 1.0), "blur2": gaussian_blur(val, 2.0),
            "bright1": brighten(val, 0.1), "bright3": brighten(val, 0.3),
            "noise": rng.uniform(-1, 1, val.shape).astype(np.float32)}
    return {name: evaluate(images, train, val, metrics=("swd", "intensity")) for name, images in sets.items()}


def test_swd_small_for_val_and_large_for_broken_sets_in_order(perturbed):
    v = {name: r["swd"]["value"] for name, r in perturbed.items()}
    baseline = perturbed["val"]["swd"]["baseline"]
    assert v["val"] < 1.25 * baseline
    assert 2 * baseline < v["blur1"] < v["blur2"] < v["noise"]
    assert baseline < v["bright1"] < v["bright3"] < v["noise"]
    assert v["bright3"] > 2 * baseline and v["noise"] > 10 * baseline
    assert len(perturbed["val"]["swd"]["levels"]) == len(perturbed["val"]["swd"]["resolutions"]) == 3  # 64, 32, 16


def test_intensity_small_for_val_and_large_for_broken_sets_in_order(perturbed):
    v = {name: r["intensity"]["value"] for name, r in perturbed.items()}
    baseline = perturbed["val"]["intensity"]["baseline"]
    assert v["val"] == pytest.approx(baseline)  # the same two sets
    assert 3 * baseline < v["bright1"] < v["bright3"]
    assert 3 * baseline < v["blur1"] < v["blur2"]
    assert v["noise"] > 10 * baseline


def test_msssim_flags_a_collapsed_set_and_passes_real_ones(slices):
    train, val = slices
    rng = np.random.default_rng(2)
    collapsed = np.clip(val[[20] * len(val)] + rng.normal(0, 0.02, val.shape), -1, 1).astype(np.float32)
    real = msssim.compute(val, train, None, seed=0)
    bad = msssim.compute(collapsed, train, None, seed=0)
    assert real["verdict"] == "ok" and bad["verdict"] == "mode collapse"
    assert bad["value"] > 0.95 > real["value"] and real["baseline"] == bad["baseline"]
    assert (real["scales"], real["window"]) == (4, 7)


def test_memorization_flags_shifted_noisy_training_copies_and_passes_val(slices, tmp_path):
    train, val = slices
    copies = memorization.compute(shifted_noisy_copies(train), train, val, worst_dir=tmp_path / "worst")
    honest = memorization.compute(val, train, val)
    assert copies["verdict"] == "memorisation" and copies["value"] > 0.9
    assert honest["verdict"] == "ok" and honest["value"] <= 0.05
    assert copies["baseline"] == honest["baseline"] <= 0.05
    # The worst pairs point at the training slice each copy came from, and are written as PNGs.
    from PIL import Image

    for row in copies["worst"]:
        assert row["train"] == row["generated"] and row["distance"] < copies["threshold"]
        with Image.open(tmp_path / "worst" / row["png"]) as im:
            assert im.size == (2 * 64, 64)
            im.verify()


def test_evaluate_returns_every_metric_with_direction_and_json_values(slices):
    import json

    train, val = slices
    result = evaluate(val[:16], train, val, seed=3)
    assert set(result) == {"swd", "msssim", "intensity", "memorization"}
    for name, r in result.items():
        assert r["higher_is_better"] is METRICS[name].higher_is_better is False
        assert isinstance(r["value"], float) and isinstance(r["baseline"], float)
    json.dumps(result, allow_nan=False)
    without_val = evaluate(val[:16], train, None, metrics=("swd", "memorization"))
    assert without_val["swd"]["baseline"] is None and without_val["memorization"]["value"] is None


def test_evaluate_rejects_mismatched_shapes(slices):
    from hpcgan.errors import UsageError

    train, val = slices
    with pytest.raises(UsageError, match=r"generated images are \(1, 32, 32\)"):
        evaluate(train[:, :, ::2, ::2], train, val)


# --- FID: only with an offline extractor --------------------------------------------------------

class TinyExtractor(torch.nn.Module):
    """Stands in for InceptionV3 to prove the plumbing: (N, 3, 299, 299) → (N, 8) features."""

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x, 2).flatten(1)  # 12 values
        return torch.cat([pooled[:, :4], x.std(dim=(1, 2, 3))[:, None], x.mean(dim=(1, 2, 3))[:, None],
                          (x > 0).float().mean(dim=(1, 2, 3))[:, None], x.amax(dim=(1, 2, 3))[:, None]], dim=1)


def test_fid_unavailable_without_weights_says_so(slices, monkeypatch):
    monkeypatch.setattr(fid, "packaged_weights", lambda: None)
    train, val = slices
    result = evaluate(val, train, val, metrics=("fid",))["fid"]
    assert result["value"] is None and "unavailable" in result["note"] and "--fid-weights" in result["note"]


def test_fid_with_a_torchscript_extractor(slices, tmp_path):
    train, val = slices
    weights = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyExtractor()).save(str(weights))
    noise = np.random.default_rng(0).uniform(-1, 1, val.shape).astype(np.float32)
    good = evaluate(val, train, val, metrics=("fid",), fid_weights=str(weights))["fid"]
    bad = evaluate(noise, train, val, metrics=("fid",), fid_weights=str(weights))["fid"]
    assert good["feature_dim"] == 8 and good["value"] == pytest.approx(good["baseline"], rel=1e-6)
    assert bad["value"] > 10 * good["value"] and bad["kid_x1e3"] > good["kid_x1e3"]


# --- pure maths ---------------------------------------------------------------------------------

def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert fid.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    # Same covariance, mean moved by (1, 2, 0): FID = 5.
    assert fid.frechet_distance(a, a + [1.0, 2.0, 0.0]) == pytest.approx(5.0, rel=1e-6)
    # Scaled by 2: tr(I + 4I − 2·2I) = 3·1 (population covariance of a is ≈ I).
    assert fid.frechet_distance(a, 2 * a) == pytest.approx(3.0, rel=0.05)


def test_histogram_wasserstein_is_the_shift_between_point_masses():
    a = np.zeros(intensity.BINS, dtype=np.int64)
    b = np.zeros_like(a)
    a[10], b[30] = 5, 7
    assert intensity.wasserstein1(a, b) == pytest.approx(20 * (1 - intensity.BACKGROUND) / intensity.BINS)
    assert intensity.wasserstein1(a, a) == 0 and intensity.wasserstein1(a, 0 * a) is None


def test_sliced_wasserstein_identity_and_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 49)).astype(np.float32)
    dirs = swd.directions(49, 0, 0, 0)
    pa = swd.sorted_projections(a, dirs)
    assert swd.sliced_wasserstein(pa, pa) == 0
    # Moving every point by t along one axis moves each projection by t·|d_0|.
    moved = a.copy()
    moved[:, 0] += 1.0
    expected = np.abs(dirs[0]).mean()
    assert swd.sliced_wasserstein(swd.sorted_projections(moved, dirs), pa) == pytest.approx(expected, rel=1e-4)


def test_ms_ssim_of_identical_images_is_one_and_scales_adapt():
    x = np.random.default_rng(0).uniform(-1, 1, (3, 1, 64, 64)).astype(np.float32)
    assert msssim.ms_ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert msssim.ms_ssim(x, -x).max() < 0.1
    assert [msssim.num_scales(s, s) for s in (32, 64, 128, 256)] == [3, 4, 5, 5]
    assert [msssim.window_size(s, s) for s in (64, 128, 256)] == [7, 7, 11]
    pairs = msssim.image_pairs(5, 1000, 0)  # few images: every pair once
    assert sorted(map(tuple, pairs)) == [(i, j) for i in range(5) for j in range(i + 1, 5)]
    pairs = msssim.image_pairs(100, 1000, 0)  # many: 1000 random pairs of different images
    assert pairs.shape == (1000, 2) and (pairs[:, 0] != pairs[:, 1]).all() and pairs.max() == 99


def test_laplacian_pyramid_reconstructs_the_image():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 64, 64)).astype(np.float32)
    levels = swd.laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    image = torch.from_numpy(levels[-1])
    for band in reversed(levels[:-1]):
        image = swd.pyr_up(image, band.shape[-2:]) + torch.from_numpy(band)
    np.testing.assert_allclose(image.numpy(), x, atol=1e-5)
