"""Task agreement between two models' greedy answers to the same prompts (token ids), and exact answers against
expected ones, as pure functions."""

from __future__ import annotations

from typing import Sequence

__all__ = ["prefix_share", "agreement", "exact_answers", "gain_kept"]


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


def exact_answers(answers: Sequence[str], expected: Sequence[str]) -> list[bool]:
    """Per prompt: the answer equals the expected one, surrounding whitespace ignored."""
    if len(answers) != len(expected):
        raise ValueError(f"{len(answers)} answers but {len(expected)} expected")
    return [a.strip() == e.strip() for a, e in zip(answers, expected)]


def gain_kept(base: float, adapter: float, repaired: float) -> float | None:
    """The share of the adapter's gain over the base that the repaired adapter keeps, ``(repaired - base) /
    (adapter - base)``; None when the adapter gains nothing over the base (there is nothing to keep)."""
    gain = adapter - base
    if gain <= 0:
        return None
    return (repaired - base) / gain
