"""The Wilson interval against its definition: the p whose score test does not reject the observed share."""

from __future__ import annotations

import math

import pytest

from salora_merge.core.stats import Z95, rate_with_interval, wilson_interval


def _inverted_score_test(k: int, n: int) -> tuple[float, float]:
    """The ends of {p : |k/n - p| <= z sqrt(p (1 - p) / n)}, by bisection on each side of k/n."""
    phat = k / n
    inside = lambda p: abs(phat - p) <= Z95 * math.sqrt(p * (1 - p) / n) + 1e-15  # noqa: E731

    def edge(lo: float, hi: float, inner_is_lo: bool) -> float:
        for _ in range(200):
            mid = (lo + hi) / 2
            if inside(mid) == inner_is_lo:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if k == 0 else edge(phat, 0.0, True)
    high = 1.0 if k == n else edge(phat, 1.0, True)
    return low, high


@pytest.mark.parametrize("k,n", [(0, 69), (2, 69), (35, 69), (69, 69), (92, 100), (1, 3)])
def test_wilson_interval_inverts_the_score_test(k, n):
    low, high = wilson_interval(k, n)
    want = _inverted_score_test(k, n)
    assert low == pytest.approx(want[0], abs=1e-9) and high == pytest.approx(want[1], abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_the_reported_text_and_the_edges():
    assert wilson_interval(0, 69)[1] == pytest.approx(Z95 ** 2 / (69 + Z95 ** 2))  # the closed form at k = 0
    assert rate_with_interval(2 / 69, 69) == "3% [1, 10]"
    assert rate_with_interval(0.5, 0) == "50%" and wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
