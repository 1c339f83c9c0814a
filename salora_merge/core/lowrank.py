"""Low-rank factors of dense updates, and LoRA factors brought to one rank and one scaling (pure)."""

from __future__ import annotations

import torch

__all__ = ["truncated_factors", "uniform_factors", "blended_factors"]


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``B (d_out, k)``, ``A (k, d_in)`` with ``B A`` the best rank-``k`` approximation of ``delta``
    (``k = min(rank, d_out, d_in)``; truncated SVD in float64, singular values split evenly), and the share
    of ``||delta||_F^2`` kept (1 for a zero ``delta``)."""
    d = delta.to(torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    total = float((s * s).sum())
    kept = float((s[:k] * s[:k]).sum()) / total if total > 0 else 1.0
    return u[:, :k] * root, root[:, None] * vh[:k], kept


def uniform_factors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]], rank: int
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (B, A, scaling)}`` as factors of rank ``rank`` with scaling 1: the scaling folded into ``B``
    and zero rows/columns appended (``B' A' = scaling B A`` exactly), so one ``r`` and ``lora_alpha`` in the
    adapter's config describe every module."""
    out = {}
    for name, (b, a, scaling) in pairs.items():
        r = a.shape[0]
        if r > rank:
            raise ValueError(f"{name}: rank {r} exceeds the uniform rank {rank}")
        b2 = torch.zeros((b.shape[0], rank), dtype=b.dtype)
        a2 = torch.zeros((rank, a.shape[1]), dtype=a.dtype)
        b2[:, :r] = b * scaling
        a2[:r] = a
        out[name] = (b2, a2)
    return out


def blended_factors(first: tuple[torch.Tensor, torch.Tensor, float], second: tuple[torch.Tensor, torch.Tensor, float],
                    weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` with scaling 1 of ``weight * s1 B1 A1 + (1 - weight) * s2 B2 A2`` for two ``(B, A,
    scaling)`` triples of one layer: the factors stacked (rank ``r1 + r2``), each ``B`` carrying its share."""
    (b1, a1, s1), (b2, a2, s2) = first, second
    b = torch.cat([b1 * (weight * s1), b2.to(b1.dtype) * ((1.0 - weight) * s2)], dim=1)
    return b, torch.cat([a1, a2.to(a1.dtype)], dim=0)
