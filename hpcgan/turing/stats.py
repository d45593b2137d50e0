"""The statistics of a visual Turing test, pure and exact: no scipy."""

import math
from fractions import Fraction

import numpy as np


def binomial_test(successes: int, trials: int) -> float:
    """Exact two-sided binomial test against 1/2: the probability of an outcome no more likely than the
    one observed (as scipy.stats.binomtest). In integers, so it is exact for any n."""
    if trials == 0:
        return 1.0
    observed = math.comb(trials, successes)
    tail = sum(c for c in (math.comb(trials, k) for k in range(trials + 1)) if c <= observed)
    return min(1.0, float(Fraction(tail, 2**trials)))


def _binomial_tail(successes: int, trials: int, p: float, upper: bool) -> float:
    """P(X >= successes) if upper, else P(X <= successes), X ~ Binomial(trials, p), 0 < p < 1."""
    ks = range(successes, trials + 1) if upper else range(0, successes + 1)
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(trials + 1)
    return sum(
        math.exp(base - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p + (trials - k) * log_q) for k in ks
    )


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple:
    """Exact (Clopper-Pearson) interval of a binomial proportion, by bisection on the binomial tails."""
    if trials == 0:
        return 0.0, 1.0
    alpha = (1.0 - confidence) / 2.0

    def solve(upper_tail: bool) -> float:
        lo, hi = 0.0, 1.0  # P(X >= k) rises with p; P(X <= k) falls
        for _ in range(80):
            mid = (lo + hi) / 2.0
            tail = _binomial_tail(successes, trials, mid, upper_tail)
            if (tail < alpha) == upper_tail:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2.0

    lower = 0.0 if successes == 0 else solve(True)
    upper = 1.0 if successes == trials else solve(False)
    return lower, upper


def fleiss_kappa(counts) -> float | None:
    """Fleiss' kappa of an (items, categories) table of how many raters put each item in each category
    (the same number of raters per item); None when chance agreement is total (one category only)."""
    counts = np.asarray(counts, dtype=np.float64)
    items, raters = counts.shape[0], counts[0].sum()
    if items == 0 or raters < 2:
        return None
    agreement = ((counts**2).sum(axis=1) - raters) / (raters * (raters - 1))
    shares = counts.sum(axis=0) / (items * raters)
    chance = float((shares**2).sum())
    if chance >= 1.0:
        return None
    return float((agreement.mean() - chance) / (1.0 - chance))


def reading_stats(readings) -> dict:
    """readings: [(truth, answer, confidence)] → accuracy, its exact test and interval, sensitivity and
    specificity for "synthetic", and accuracy by confidence level."""
    n = len(readings)
    correct = sum(truth == answer for truth, answer, _ in readings)
    synthetic = [answer for truth, answer, _ in readings if truth == "synthetic"]
    real = [answer for truth, answer, _ in readings if truth == "real"]
    lower, upper = clopper_pearson(correct, n)
    by_confidence = {}
    for level in sorted({c for _, _, c in readings if c is not None}):
        at_level = [truth == answer for truth, answer, c in readings if c == level]
        by_confidence[str(level)] = {
            "n": len(at_level),
            "correct": sum(at_level),
            "accuracy": sum(at_level) / len(at_level),
        }
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "ci95": [lower, upper],
        "p_value": binomial_test(correct, n),
        "sensitivity": synthetic.count("synthetic") / len(synthetic) if synthetic else None,
        "specificity": real.count("real") / len(real) if real else None,
        "by_confidence": by_confidence,
    }
