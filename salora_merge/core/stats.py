"""Confidence intervals for the rates the tool reports (refusal shares over a few dozen prompts)."""

from __future__ import annotations

import math

__all__ = ["wilson_interval", "rate_with_interval"]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends where rounding would miss them
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rate_with_interval(rate: float, n: int) -> str:
    """``"3% [1, 10]"``: a rate over ``n`` items with its 95% Wilson interval, in percent."""
    if n <= 0:
        return f"{rate:.0%}"
    low, high = wilson_interval(round(rate * n), n)
    return f"{rate:.0%} [{low * 100:.0f}, {high * 100:.0f}]"
