"""How large a top-1 drop could still hide behind what was measured: one-sided upper confidence bounds.

A candidate is judged on a finite set of images, so its measured drop is a sample. `plan` chooses by
the bound, not by the point estimate: a candidate fits a 1-point budget only when the images show,
with 95% confidence, that it loses no more than 1 point.

- With labels the drop is paired: the original and the candidate see the same images, and only the
  images one gets right and the other wrong move the difference. The bound is Tango's score bound for
  a difference of paired proportions (Tango 1998, Stat. Med. 17:891): it keeps its coverage when one
  kind of discordant image is rare or absent, where the plain normal bound (mean + 1.645 s.e.) does not.
- Without labels the drop is the disagreement with the original, a plain proportion: Wilson's score
  bound.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

CONFIDENCE = 0.95


def _z(confidence: float) -> float:
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    return float(norm.ppf(confidence))


def paired_drop_bound(reference_correct: np.ndarray, candidate_correct: np.ndarray,
                      confidence: float = CONFIDENCE) -> float:
    """Upper bound on (reference accuracy − candidate accuracy) from per-image correctness of both."""
    reference_correct = np.asarray(reference_correct, dtype=bool)
    candidate_correct = np.asarray(candidate_correct, dtype=bool)
    if reference_correct.shape != candidate_correct.shape or reference_correct.ndim != 1:
        raise ValueError("paired outcomes must be two 1-D arrays of the same length")
    lost = int(np.sum(reference_correct & ~candidate_correct))
    gained = int(np.sum(~reference_correct & candidate_correct))
    return tango_upper_bound(lost, gained, len(reference_correct), confidence)


def tango_upper_bound(lost: int, gained: int, n: int, confidence: float = CONFIDENCE) -> float:
    """Tango's one-sided score bound on (lost − gained) / n, the paired drop: `lost` images only the
    reference gets right, `gained` only the candidate, `n` images in all."""
    if n < 1 or lost < 0 or gained < 0 or lost + gained > n:
        raise ValueError(f"impossible paired counts: {lost} lost, {gained} gained of {n}")
    z = _z(confidence)

    def score(delta: float) -> float:
        # The restricted maximum-likelihood estimate of P(gained) given the drop delta (closed form).
        a = 2 * n
        b = -lost - gained + (2 * n - lost + gained) * delta
        c = -gained * delta * (1 - delta)
        q = (math.sqrt(max(b * b - 4 * a * c, 0.0)) - b) / (2 * a)
        variance = n * (2 * q + delta * (1 - delta))
        return (lost - gained - n * delta) / math.sqrt(max(variance, 1e-300))

    top = 1 - 1e-12
    if score(top) >= -z:
        return 1.0
    return float(brentq(lambda d: score(d) + z, (lost - gained) / n, top, xtol=1e-12))


def proportion_bound(count: int, n: int, confidence: float = CONFIDENCE) -> float:
    """Wilson's one-sided score bound on a proportion (e.g. disagreement: `count` of `n` images)."""
    if n < 1 or not 0 <= count <= n:
        raise ValueError(f"impossible count: {count} of {n}")
    z = _z(confidence)
    p = count / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def smallest_confirmable(n: int, confidence: float = CONFIDENCE) -> float:
    """The bound of a candidate that matches the reference on every one of `n` images: no drop smaller
    than this can be confirmed on them, however good the candidate."""
    return tango_upper_bound(0, 0, n, confidence)
