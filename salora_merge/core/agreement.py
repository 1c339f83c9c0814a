"""Task agreement between two models' greedy answers to the same prompts (token ids), as pure functions."""

from __future__ import annotations

from typing import Sequence

__all__ = ["prefix_share", "agreement"]


def prefix_share(reference: Sequence[int], other: Sequence[int]) -> float:
    """Length of the common prefix over the longer answer's length: 1.0 for identical answers, 0.0 when they
    differ from the first token. Two empty answers agree fully."""
    longest = max(len(reference), len(other))
    if longest == 0:
        return 1.0
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / longest


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict[str, float]:
    """``exact``: share of prompts answered identically; ``prefix``: mean :func:`prefix_share`."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference answers but {len(other)} others")
    if not reference:
        return {"exact": float("nan"), "prefix": float("nan")}
    exact = sum(list(a) == list(b) for a, b in zip(reference, other)) / len(reference)
    prefix = sum(prefix_share(a, b) for a, b in zip(reference, other)) / len(reference)
    return {"exact": exact, "prefix": prefix}
