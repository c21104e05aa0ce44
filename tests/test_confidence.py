"""The bounds `plan` chooses by: checked against an independent computation and by their coverage."""
import math

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import norm

from vit2trt.converter.measure.confidence import (paired_drop_bound, proportion_bound, smallest_confirmable,
                                                  tango_upper_bound)

Z95 = norm.ppf(0.95)


def _score_by_likelihood(lost: int, gained: int, n: int, delta: float) -> float:
    """The score statistic with the nuisance P(gained) found by maximising the likelihood numerically,
    not by the closed form: cells P(lost) = q + delta, P(gained) = q, P(same) = 1 - 2q - delta."""
    low, high = max(0.0, -delta) + 1e-15, (1 - delta) / 2 - 1e-15

    def neg_log_likelihood(q):
        terms = [(lost, q + delta), (gained, q), (n - lost - gained, 1 - 2 * q - delta)]
        return -sum(k * math.log(max(p, 1e-300)) for k, p in terms if k)

    q = minimize_scalar(neg_log_likelihood, bounds=(low, high), method="bounded",
                        options={"xatol": 1e-13}).x
    return (lost - gained - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))


@pytest.mark.parametrize("lost,gained,n", [(20, 10, 500), (7, 0, 300), (0, 0, 128), (40, 45, 1000), (3, 1, 64)])
def test_paired_bound_equals_an_independent_likelihood_computation(lost, gained, n):
    rng = np.random.default_rng(lost * 1000 + gained)
    reference = rng.random(n) < 0.7
    # Build per-image outcomes with exactly these discordant counts (order shuffled).
    kinds = np.array([1] * lost + [2] * gained + [0] * (n - lost - gained))
    rng.shuffle(kinds)
    reference = np.where(kinds == 1, True, np.where(kinds == 2, False, reference))
    candidate = np.where(kinds == 1, False, np.where(kinds == 2, True, reference))
    got = paired_drop_bound(reference, candidate)
    estimate = (lost - gained) / n
    want = brentq(lambda d: _score_by_likelihood(lost, gained, n, d) + Z95, estimate, 0.999)
    assert got == pytest.approx(want, abs=2e-6)
    assert got > estimate


def test_wilson_bound_equals_solving_the_score_equation():
    for count, n in [(0, 50), (5, 200), (60, 100), (199, 200)]:
        p = count / n
        want = brentq(lambda t: (p - t) / math.sqrt(t * (1 - t) / n) + Z95, p + 1e-12, 1 - 1e-12)
        assert proportion_bound(count, n) == pytest.approx(want, abs=1e-9)


def test_identical_outcomes_confirm_no_smaller_drop_than_the_floor():
    # No drop observed on n images: the floor is z^2 / (n + z^2), shrinking as images are added.
    for n in (128, 2000):
        assert smallest_confirmable(n) == pytest.approx(Z95 ** 2 / (n + Z95 ** 2), rel=1e-6)
    assert smallest_confirmable(2000) < 0.002 < 0.01 < smallest_confirmable(128) < 0.03


@pytest.mark.parametrize("p_lost,p_gained,n", [(0.03, 0.02, 500), (0.01, 0.0, 500), (0.12, 0.04, 200),
                                               (0.05, 0.05, 2000)])
def test_paired_bound_covers_the_true_drop_in_at_least_93_percent_of_400_trials(p_lost, p_gained, n):
    rng = np.random.default_rng(0)
    truth = p_lost - p_gained
    covered = 0
    for _ in range(400):
        lost, gained, _ = rng.multinomial(n, [p_lost, p_gained, 1 - p_lost - p_gained])
        covered += tango_upper_bound(int(lost), int(gained), n) >= truth - 1e-12
    assert covered >= 0.93 * 400, f"{covered} of 400 covered"
    # And it is not vacuous: a typical bound sits within a few standard errors of the truth.
    se = math.sqrt((p_lost + p_gained - truth ** 2) / n)
    assert tango_upper_bound(round(n * p_lost), round(n * p_gained), n) < truth + 3 * se + 4 / n


def test_disagreement_bound_covers_in_at_least_93_percent_of_400_trials():
    rng = np.random.default_rng(1)
    for p, n in [(0.02, 300), (0.1, 128)]:
        covered = sum(proportion_bound(int(rng.binomial(n, p)), n) >= p for _ in range(400))
        assert covered >= 0.93 * 400, (p, n, covered)


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError):
        tango_upper_bound(5, 6, 10)
    with pytest.raises(ValueError):
        proportion_bound(3, 2)
    with pytest.raises(ValueError):
        paired_drop_bound(np.ones(3, bool), np.ones(4, bool))
