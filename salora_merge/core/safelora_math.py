"""Safe LoRA (Hsu et al., NeurIPS 2024) as pure functions over tensors: the baseline users compare against.

Per adapted module, with ``V = W_aligned - W_unaligned`` (the alignment direction of that weight) the
projection is ``C = V V^T / ||V||_F`` (as in the authors' code; not an orthogonal projector). A module is
projected (``B := C B``) when ``cos(vec(C dW), vec(dW)) <= threshold``, or, in top-K mode, when it is
among the K modules with the lowest cosine. Nothing here forms ``dW`` or ``C``: ``C B = V (V^T B) / ||V||_F``
and the cosine comes from ``r x r`` Gram matrices.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["safelora_B", "update_cosine", "select_modules"]


def safelora_B(lora_B: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """``C B = V (V^T B) / ||V||_F`` in float64 (``lora_B: (d_out, r)``, ``alignment = V: (d_out, d_in)``)."""
    v = alignment.to(torch.float64)
    norm = torch.linalg.matrix_norm(v)
    if norm == 0:
        raise ValueError("the aligned and unaligned weights are identical: no alignment direction")
    return v @ (v.T @ lora_B.to(torch.float64)) / norm


def update_cosine(lora_B: torch.Tensor, projected_B: torch.Tensor, lora_A: torch.Tensor) -> float:
    """``cos(vec(B' A), vec(B A)) = tr(B'^T B A A^T) / (||B' A|| ||B A||)`` from ``r x r`` products."""
    a = lora_A.to(torch.float64)
    b = lora_B.to(torch.float64)
    p = projected_B.to(torch.float64)
    gram_a = a @ a.T
    inner = float(((p.T @ b) * gram_a).sum())
    norm_p = float(((p.T @ p) * gram_a).sum()) ** 0.5
    norm_b = float(((b.T @ b) * gram_a).sum()) ** 0.5
    if norm_p == 0 or norm_b == 0:
        return 0.0
    return inner / (norm_p * norm_b)


def select_modules(cosines: Mapping[str, float], threshold: float | None, top_k: int | None) -> set[str]:
    """The modules to project: cosine at most ``threshold``, or the ``top_k`` lowest (ties by name)."""
    if (threshold is None) == (top_k is None):
        raise ValueError("give exactly one of threshold or top_k")
    if threshold is not None:
        return {name for name, c in cosines.items() if c <= threshold}
    ranked = sorted(cosines, key=lambda name: (cosines[name], name))
    return set(ranked[: max(0, int(top_k))])
