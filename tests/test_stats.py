"""Binomial intervals against scipy's independent implementation and hand-computed values."""

import pytest
from scipy.stats import binomtest

from rlflow.utils.stats import wilson_interval


@pytest.mark.parametrize(("successes", "trials"), [(0, 50), (20, 50), (50, 50), (1, 3), (37, 311)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_interval_matches_scipy(successes, trials, confidence):
    reference = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = wilson_interval(successes, trials, confidence)
    assert low == pytest.approx(float(reference.low), abs=1e-12)
    assert high == pytest.approx(float(reference.high), abs=1e-12)


def test_wilson_interval_by_hand():
    # 0 of 50 at 95%: high = z^2 / (n + z^2) with z = 1.959964 -> 3.841459 / 53.841459.
    assert wilson_interval(0, 50) == pytest.approx((0.0, 3.841459 / 53.841459), abs=1e-6)


@pytest.mark.parametrize(("successes", "trials", "confidence"), [(1, 0, 0.95), (4, 3, 0.95), (1, 3, 1.0)])
def test_wilson_interval_refuses_impossible_counts(successes, trials, confidence):
    with pytest.raises(ValueError):
        wilson_interval(successes, trials, confidence)
