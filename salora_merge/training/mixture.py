"""The anchored training mixture: the user's examples with refusal anchors mixed into every batch in an exact
share (pure functions over indices; the trainer reads the result in order)."""

from __future__ import annotations

import math
import random

from salora_merge.errors import InputError

__all__ = ["anchors_per_batch", "mixed_order", "mixture_steps"]


def anchors_per_batch(share: float, batch_size: int) -> int:
    """Anchors in each batch of ``batch_size``: ``round(share * batch_size)``, at least 1 for a positive share;
    at least one place is left for the user's examples."""
    if not 0.0 <= share < 1.0:  # also NaN
        raise InputError(f"--anchor-share must be at least 0 and below 1 (the rest of each batch is your data), "
                         f"got {share}")
    if share == 0.0:
        return 0
    k = max(1, round(share * batch_size))
    if k >= batch_size:
        raise InputError(f"--anchor-share {share:g} leaves no place for your data in a batch of {batch_size}; lower "
                         "it or raise --batch-size")
    return k


def mixture_steps(n_task: int, per_batch: int, batch_size: int, grad_accum: int, epochs: float,
                  max_steps: int) -> tuple[int, int]:
    """(optimizer steps, passes over the user's data): ``max_steps`` when positive, else the steps that take
    every user example ``epochs`` times, ``batch_size - per_batch`` of them per batch."""
    per = batch_size - per_batch
    if max_steps > 0:
        return max_steps, max(1, math.ceil(max_steps * grad_accum * per / max(1, n_task)))
    batches = math.ceil(epochs * math.ceil(n_task / per))
    return max(1, math.ceil(batches / grad_accum)), max(1, math.ceil(epochs))


def mixed_order(n_task: int, n_anchors: int, per_batch: int, batch_size: int, passes: int, seed: int
                ) -> list[tuple[bool, int]]:
    """The training order as ``(is_anchor, index)``: ``passes`` seeded shuffles of the user's examples, cut into
    consecutive batches of ``batch_size - per_batch``, each joined by ``per_batch`` anchors (cycled through
    seeded shuffles of the anchors) and shuffled within itself. Read in order in batches of ``batch_size``,
    every batch but the last holds exactly ``per_batch`` anchors; the last one, shorter, holds the same share
    rounded."""
    rng = random.Random(seed)
    task: list[int] = []
    for _ in range(passes):
        order = list(range(n_task))
        rng.shuffle(order)
        task += order
    anchors: list[int] = []

    def next_anchor() -> int:
        if not anchors:
            cycle = list(range(n_anchors))
            rng.shuffle(cycle)
            anchors.extend(reversed(cycle))
        return anchors.pop()

    per = batch_size - per_batch
    out: list[tuple[bool, int]] = []
    for start in range(0, len(task), per):
        chunk = task[start:start + per]
        k = per_batch if len(chunk) == per else round(len(chunk) * per_batch / per)
        batch = [(False, i) for i in chunk] + [(True, next_anchor()) for _ in range(k if n_anchors else 0)]
        rng.shuffle(batch)
        out += batch
    return out
