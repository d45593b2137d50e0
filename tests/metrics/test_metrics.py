"""The metrics on real brain slices (the `sample_dataset` fixture: MNI152 in train, Colin27 in val):
each must separate real-like sets from broken ones, in the right order. Plus the pure maths."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcgan.data import read_slices
from hpcgan.errors import UsageError
from hpcgan.metrics import (
    METRICS,
    check_metric_names,
    evaluate,
    fid,
    format_table,
    intensity,
    memorization,
    msssim,
    parse_metrics,
    swd,
)
from conftest import TinyExtractor


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def slices(sample_dataset):
    return read_slices(sample_dataset, "train"), read_slices(sample_dataset, "val")


def gaussian_blur(images, sigma):
    size = int(4 * sigma) | 1
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
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


BIN_WIDTH = (1 - intensity.BACKGROUND) / intensity.BINS


def foreground(images):
    """The brain pixels the intensity metric compares (above the background level)."""
    values = np.asarray(images, np.float64).ravel()
    return values[values > intensity.BACKGROUND]


@pytest.fixture(scope="module")
def perturbed(slices):
    train, val = slices
    rng = np.random.default_rng(1)
    sets = {
        "val": val,
        "blur1": gaussian_blur(val, 1.0),
        "blur2": gaussian_blur(val, 2.0),
        "bright1": brighten(val, 0.1),
        "bright3": brighten(val, 0.3),
        "noise": rng.uniform(-1, 1, val.shape).astype(np.float32),
    }
    return {name: evaluate(images, train, val, metrics=("swd", "intensity")) for name, images in sets.items()}


def test_swd_small_for_val_and_large_for_broken_sets_in_order(perturbed):
    v = {name: r["swd"]["value"] for name, r in perturbed.items()}
    baseline = perturbed["val"]["swd"]["baseline"]
    assert v["val"] < 1.25 * baseline
    assert 2 * baseline < v["blur1"] < v["blur2"] < v["noise"]
    assert baseline < v["bright1"] < v["bright3"] < v["noise"]
    assert v["bright3"] > 2 * baseline and v["noise"] > 10 * baseline
    assert len(perturbed["val"]["swd"]["levels"]) == len(perturbed["val"]["swd"]["resolutions"]) == 3  # 64, 32, 16


def test_intensity_small_for_val_and_large_for_broken_sets_in_order(perturbed, slices):
    from scipy.stats import wasserstein_distance

    v = {name: r["intensity"]["value"] for name, r in perturbed.items()}
    baseline = perturbed["val"]["intensity"]["baseline"]
    train, val = slices
    # The histogram's W1 is the exact W1 of the brain pixels up to the binning (at most a bin width,
    # 0.1% on these slices).
    assert baseline == pytest.approx(wasserstein_distance(foreground(val), foreground(train)), rel=0.01)
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
    # The threshold is the 1st percentile of 48 validation distances (linear interpolation: between
    # the smallest two), so exactly one validation slice lies below it.
    assert copies["baseline"] == honest["baseline"] == pytest.approx(1 / len(val))
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
    train, val = slices
    with pytest.raises(UsageError, match=r"generated images are \(1, 32, 32\)"):
        evaluate(train[:, :, ::2, ::2], train, val)


def test_metric_names_checked_in_one_format(slices):
    known = "(known: swd, msssim, intensity, memorization, fid)"
    assert parse_metrics(" swd, fid,") == ("swd", "fid")
    with pytest.raises(UsageError) as bad:
        parse_metrics("swd,ssim,kid")
    assert str(bad.value) == f"--metrics: unknown metric 'ssim' {known}"
    with pytest.raises(UsageError, match=r"^--metrics: no metric given \(known: swd,"):
        parse_metrics(" , ")
    # ValueError for config dataclasses: hpcgan.config turns it into a UsageError naming the file
    with pytest.raises(ValueError, match=r"^eval.metrics: no metric given"):
        check_metric_names([], "eval.metrics", ValueError)
    train, val = slices
    with pytest.raises(UsageError, match=r"^metrics: unknown metric 'ssim' \(known: swd,"):
        evaluate(val[:4], train, val, metrics=("swd", "ssim"))


# --- FID: only with an offline extractor --------------------------------------------------------


def test_fid_unavailable_without_weights_says_so(slices, monkeypatch):
    monkeypatch.setattr(fid, "packaged_weights", lambda: None)
    train, val = slices
    result = evaluate(val, train, val, metrics=("fid",))
    assert result["fid"]["value"] is None and "--fid-weights" in result["fid"]["note"]
    assert "fid: unavailable (no offline Inception weights; pass --fid-weights" in format_table(result)


def reference_fid(a, b):
    """Fréchet distance as pytorch-fid computes it: scipy's sqrtm of the product of the covariances."""
    from scipy import linalg

    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def reference_mmd2(a, b):
    """Unbiased MMD² of two equal-sized sets with the cubic polynomial kernel (x·y/d + 1)³, pair by pair."""
    n, d = len(a), a.shape[1]
    kernel = lambda x, y: (x @ y / d + 1) ** 3  # noqa: E731
    same_a = sum(kernel(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    same_b = sum(kernel(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(kernel(a[i], b[j]) for i in range(n) for j in range(n)) / (n * n)
    return same_a + same_b - 2 * cross


def test_fid_and_kid_with_a_torchscript_extractor_match_a_direct_computation(slices, fid_weights):
    train, val = slices
    noise = np.random.default_rng(0).uniform(-1, 1, val.shape).astype(np.float32)
    reordered = evaluate(train[::-1].copy(), train, val, metrics=("fid",), fid_weights=str(fid_weights))["fid"]
    bad = evaluate(noise, train, val, metrics=("fid",), fid_weights=str(fid_weights))["fid"]
    # The features by hand: grey repeated to RGB, bilinear to 299 px, the extractor run eagerly.
    extractor = TinyExtractor()
    with torch.no_grad():
        f_train, f_val = (
            extractor(
                F.interpolate(
                    torch.from_numpy(x).repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False
                )
            )
            .double()
            .numpy()
            for x in (train, val)
        )
    assert reordered["feature_dim"] == 8
    assert reordered["value"] == pytest.approx(0, abs=1e-9 * reordered["baseline"])  # the same set, reordered
    assert reordered["baseline"] == pytest.approx(reference_fid(f_val, f_train), rel=1e-6)
    # 48 images a set: every KID subset is the whole set, so KID is the unbiased MMD² of the two sets.
    assert reordered["baseline_kid_x1e3"] == pytest.approx(1e3 * reference_mmd2(f_val, f_train), rel=1e-6)
    assert bad["value"] > 10 * reordered["baseline"] and bad["kid_x1e3"] > 10 * reordered["baseline_kid_x1e3"]


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


# --- known answers: each metric against an independent computation -----------------------------


def reference_ssim_terms(x, y, window_size):
    """Mean SSIM and mean contrast-structure term of one (C, H, W) pair, straight from Wang et al.
    (2004): a Gaussian window (σ 1.5) visited at every position where it fits, μ = Σ w·x,
    σ² = Σ w·(x − μ)², σ_xy = Σ w·(x − μ_x)(y − μ_y), C1 = (0.01 L)², C2 = (0.03 L)², L = 2; float64."""
    from numpy.lib.stride_tricks import sliding_window_view

    t = np.arange(window_size) - (window_size - 1) / 2
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / g.sum() ** 2
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    ssim_maps, cs_maps = [], []
    for xc, yc in zip(np.asarray(x, np.float64), np.asarray(y, np.float64)):
        px = sliding_window_view(xc, (window_size, window_size))
        py = sliding_window_view(yc, (window_size, window_size))
        mu_x, mu_y = (w * px).sum((-2, -1)), (w * py).sum((-2, -1))
        dx, dy = px - mu_x[..., None, None], py - mu_y[..., None, None]
        var_x, var_y, cov = (w * dx * dx).sum((-2, -1)), (w * dy * dy).sum((-2, -1)), (w * dx * dy).sum((-2, -1))
        cs = (2 * cov + c2) / (var_x + var_y + c2)
        ssim_maps.append((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs)
        cs_maps.append(cs)
    return np.mean(ssim_maps), np.mean(cs_maps)


def reference_ms_ssim(x, y, window_size, scales):
    """MS-SSIM (Wang et al. 2003) of one pair: contrast-structure at scales 1..M−1, SSIM at scale M,
    each clipped at 0 and raised to the standard weights of those scales (renormalised); between
    scales a 2×2 mean (an odd last row or column is dropped)."""
    weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales])
    weights /= weights.sum()
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    result = 1.0
    for s in range(scales):
        ssim_value, cs = reference_ssim_terms(x, y, window_size)
        result *= max(ssim_value if s == scales - 1 else cs, 0.0) ** weights[s]
        c, h, w = x.shape
        x, y = (v[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2).mean((2, 4)) for v in (x, y))
    return result


@pytest.fixture(scope="module")
def ssim_cases(slices):
    """Pairs of real slices from bright copies to different subjects, at the sizes the metrics
    meet: 64² grey, 64² with 3 channels, an odd 45×64 crop and 176² (the 11×11 window, 5 scales)."""
    train, val = slices
    rng = np.random.default_rng(4)
    noisy = np.clip(val + rng.normal(0, 0.1, val.shape), -1, 1).astype(np.float32)
    big = F.interpolate(torch.from_numpy(val[10:13]), size=(176, 176), mode="bilinear", align_corners=False).numpy()
    big_blur = gaussian_blur(big, 2.0)
    return {
        "64 different subjects": (train[[5, 20, 40]], val[[5, 20, 40]], 7, 4),
        "64 blurred": (val[[8, 30]], gaussian_blur(val[[8, 30]], 1.0), 7, 4),
        "64 noisy": (val[[12, 25]], noisy[[12, 25]], 7, 4),
        "64 brightened": (val[[15]], brighten(val[[15]], 0.3), 7, 4),
        "64 upside down": (val[[20, 35]], val[[20, 35], :, ::-1], 7, 4),
        "64 against noise": (val[[4, 40]], rng.uniform(-1, 1, (2, 1, 64, 64)).astype(np.float32), 7, 4),
        "64 three channels": (train[10:16].reshape(2, 3, 64, 64), val[10:16].reshape(2, 3, 64, 64), 7, 4),
        "45x64 odd": (train[[20, 30], :, 9:54], noisy[[20, 30], :, 9:54], 7, 3),
        "176": (big, big_blur, 11, 5),
    }


def test_ssim_and_ms_ssim_match_a_plain_implementation_of_wang_et_al(ssim_cases):
    values = []
    for name, (x, y, window, scales) in ssim_cases.items():
        assert (msssim.window_size(*x.shape[-2:]), msssim.num_scales(*x.shape[-2:])) == (window, scales), name
        expected_ssim = [reference_ssim_terms(a, b, window)[0] for a, b in zip(x, y)]
        expected_ms = [reference_ms_ssim(a, b, window, scales) for a, b in zip(x, y)]
        np.testing.assert_allclose(msssim.ssim(x, y), expected_ssim, rtol=0, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(msssim.ms_ssim(x, y), expected_ms, rtol=0, atol=2e-5, err_msg=name)
        values += expected_ms
    assert min(values) < 0.1 and max(values) > 0.95  # the cases span unrelated to near-identical pairs


def test_mean_pair_ms_ssim_of_a_small_set_is_the_mean_over_every_pair(slices):
    images = slices[1][[3, 9, 17, 26, 33, 45]]
    expected = np.mean([reference_ms_ssim(images[i], images[j], 7, 4) for i in range(6) for j in range(i + 1, 6)])
    assert msssim.mean_pair_ms_ssim(images, seed=5) == pytest.approx(expected, abs=2e-5)


def test_intensity_w1_equals_scipy_wasserstein_distance(slices):
    """On pixels at the histogram's bin centres the histogram W1 is exact; on the raw slices it is
    within one bin width."""
    from scipy.stats import wasserstein_distance

    train, val = slices
    bright = brighten(val, 0.1)

    def to_bin_centres(images):
        bins = np.clip(np.floor((images - intensity.BACKGROUND) / BIN_WIDTH), 0, intensity.BINS - 1)
        centres = intensity.BACKGROUND + (bins + 0.5) * BIN_WIDTH
        return np.where(images > intensity.BACKGROUND, centres, -1.0).astype(np.float32)

    for fake in (val, bright):
        on_centres = intensity.compute(to_bin_centres(fake), to_bin_centres(train), None)["value"]
        exact = wasserstein_distance(foreground(to_bin_centres(fake)), foreground(to_bin_centres(train)))
        assert on_centres == pytest.approx(exact, rel=1e-6)
        raw = intensity.compute(fake, train, None)["value"]
        assert raw == pytest.approx(wasserstein_distance(foreground(fake), foreground(train)), abs=BIN_WIDTH)


def mean_abs_projection(v, dirs):
    """Mean over unit directions θ of |θ·v|: the sliced W1 between a point set and its translate by v."""
    return float(np.abs(dirs.T.astype(np.float64) @ v).mean())


def test_sliced_wasserstein_of_a_translated_set_has_its_closed_form():
    """Translating a set by v moves its projection on θ by θ·v, so the 1-D W1 is |θ·v| exactly; over
    directions uniform on the sphere its mean is ‖v‖·Γ(d/2) / (√π·Γ((d+1)/2))."""
    from scipy.special import gammaln

    rng = np.random.default_rng(0)
    dim = 49
    points = rng.standard_normal((2000, dim)).astype(np.float32)
    v = rng.standard_normal(dim)
    v *= 0.5 / np.linalg.norm(v)
    moved = (points + v).astype(np.float32)
    all_dirs = np.concatenate([swd.directions(dim, 0, 0, r) for r in range(swd.DIR_REPEATS)], axis=1)
    measured = [
        swd.sliced_wasserstein(swd.sorted_projections(moved, d), swd.sorted_projections(points, d))
        for d in np.split(all_dirs, swd.DIR_REPEATS, axis=1)
    ]
    assert np.mean(measured) == pytest.approx(mean_abs_projection(v, all_dirs), rel=1e-4)
    closed_form = 0.5 * np.exp(gammaln(dim / 2) - gammaln((dim + 1) / 2)) / np.sqrt(np.pi)
    # 512 directions: the sample mean of |θ·v| is within ~3% (1 standard error) of its expectation.
    assert np.mean(measured) == pytest.approx(closed_form, rel=0.1)


def test_sliced_wasserstein_in_one_dimension_is_scipys_w1():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, (4000, 1)).astype(np.float32)
    b = rng.gamma(2.0, 1.0, (4000, 1)).astype(np.float32)
    one_direction = np.ones((1, 1), np.float32)
    pa, pb = swd.sorted_projections(a, one_direction), swd.sorted_projections(b, one_direction)
    assert swd.sliced_wasserstein(pa, pb) == pytest.approx(wasserstein_distance(a[:, 0], b[:, 0]), rel=1e-5)
    # Sets of different sizes are matched at the smaller set's quantiles.
    pb_big = swd.sorted_projections(rng.gamma(2.0, 1.0, (12000, 1)).astype(np.float32), one_direction)
    assert swd.sliced_wasserstein(pa, pb_big) == pytest.approx(wasserstein_distance(pa[0], pb_big[0]), rel=0.01)


def test_swd_of_a_brightness_shift_has_its_closed_form():
    """Flat images: every Laplacian band is exactly 0 and the coarsest level's 7×7 descriptors are
    c·1, so adding δ to every pixel translates the normalised descriptors by (δ/σ)·1, with σ the
    training set's std of c. Then SWD = 1e3 · mean over levels = 1e3/3 · (δ/σ) · mean_θ |θ·1|.
    (Values on a 1/64 grid keep the blur sums exact.)"""
    rng = np.random.default_rng(2)
    levels = rng.integers(-40, 41, size=40) / 64
    train = np.broadcast_to(levels[:, None, None, None], (40, 1, 64, 64)).astype(np.float32)
    delta = 0.25
    result = swd.compute(train + np.float32(delta), train, train.copy(), seed=3)
    coarse_dirs = np.concatenate([swd.directions(49, 3, 2, r) for r in range(swd.DIR_REPEATS)], axis=1)
    coarse = 1e3 * delta / levels.std() * mean_abs_projection(np.ones(49), coarse_dirs)  # reported x1e3
    assert result["levels"][:2] == [0.0, 0.0]
    assert result["levels"][2] == pytest.approx(coarse, rel=1e-4)
    assert result["value"] == pytest.approx(coarse / 3, rel=1e-4)
    assert result["baseline"] == 0.0  # the same flat images, whatever patches were drawn
