"""RESTA (Bhardwaj et al., ACL 2024): add the safety vector back, ``W' = W_ft + gamma (W_aligned - W_unaligned)``,
as LoRA factors (pure)."""

from __future__ import annotations

import torch

from salora_merge.core.lowrank import truncated_factors

__all__ = ["safety_vector_factors", "with_safety_vector"]


def safety_vector_factors(v: torch.Tensor, gamma: float, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``gamma V`` as rank-``rank`` factors (truncated SVD; exact when ``V`` has at most that rank), with the
    share of ``||V||_F^2`` the factors keep."""
    b, a, kept = truncated_factors(v.to(torch.float64), rank)
    return b * gamma, a, kept


def with_safety_vector(lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float, vb: torch.Tensor,
                       va: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``scaling B A + Vb Va`` with scaling 1: ``[scaling B, Vb] [A; Va]`` (rank ``r + k``)."""
    b = torch.cat([lora_b.to(torch.float64) * scaling, vb.to(torch.float64)], dim=1)
    a = torch.cat([lora_a.to(torch.float64), va.to(torch.float64)], dim=0)
    return b, a
