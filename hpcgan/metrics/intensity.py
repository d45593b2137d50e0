"""Intensity: Wasserstein-1 distance between the intensity histograms of the non-background
(brain) pixels of two image sets, in the [-1, 1] units the images are stored in.

Background is -1 after preprocessing; a generator only gets close, so "background" is every
pixel at or below BACKGROUND (about 6 grey levels of 255 above black)."""

import numpy as np

from hpcgan.parallel.group import ONE_PROCESS
from hpcgan.parallel.split import map_units

BACKGROUND = -0.95
BINS = 256
# The counts are integers, so the chunk size never changes the result; small chunks spread even a
# few hundred images over several ranks.
IMAGES_PER_UNIT = 64


def histogram(images, group=ONE_PROCESS) -> np.ndarray:
    """Counts (BINS,) of the foreground pixels over [BACKGROUND, 1], images split across ranks."""
    units = range(0, len(images), IMAGES_PER_UNIT)

    def unit(i):
        values = np.asarray(images[units[i] : units[i] + IMAGES_PER_UNIT], np.float32).ravel()
        values = values[values > BACKGROUND]
        return np.histogram(np.clip(values, BACKGROUND, 1.0), bins=BINS, range=(BACKGROUND, 1.0))[0]

    return np.sum(map_units(group, len(units), unit), axis=0)


def wasserstein1(counts_a: np.ndarray, counts_b: np.ndarray) -> float | None:
    """W1 between two histograms on the same bins: ∑ |CDF_a − CDF_b| · bin width."""
    if counts_a.sum() == 0 or counts_b.sum() == 0:
        return None
    cdf_a = np.cumsum(counts_a) / counts_a.sum()
    cdf_b = np.cumsum(counts_b) / counts_b.sum()
    return float(np.abs(cdf_a - cdf_b).sum() * (1.0 - BACKGROUND) / BINS)


def foreground_fraction(counts: np.ndarray, images) -> float:
    return float(counts.sum() / max(1, np.prod(np.shape(images))))


def compute(fake, train, val, group=ONE_PROCESS, **_):
    """value: W1(generated, train); baseline: W1(val, train)."""
    h_fake, h_train = histogram(fake, group), histogram(train, group)
    out = {
        "value": wasserstein1(h_fake, h_train),
        "baseline": None,
        "foreground_fraction": {
            "generated": foreground_fraction(h_fake, fake),
            "train": foreground_fraction(h_train, train),
        },
    }
    if out["value"] is None:
        out["note"] = "no foreground pixels in the generated or the training images"
    if val is not None and len(val):
        h_val = histogram(val, group)
        out["baseline"] = wasserstein1(h_val, h_train)
        out["foreground_fraction"]["val"] = foreground_fraction(h_val, val)
    return out
