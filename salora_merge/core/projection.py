"""Re-projection of LoRA factors and the share of an update in a subspace. Pure tensor math.

A LoRA update is ``dW = s * B @ A`` with ``lora_A: (r, d_in)``, ``lora_B: (d_out, r)``. No function
here forms ``dW`` or any ``(d_out, d_out)`` matrix.
"""

from __future__ import annotations

import torch

__all__ = ["project_lora_B", "project_lora_A", "subspace_energy_fraction", "update_norm_sq"]


def project_lora_B(lora_B: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``B' = (I - U U^T) B = B - U (U^T B)``, computed in float64, returned in ``lora_B``'s dtype.

    Args:
        lora_B: ``(d_out, r)``.
        basis: ``U``, ``(d_out, k)`` with orthonormal columns.
    """
    b = lora_B.to(torch.float64)
    u = basis.to(device=b.device, dtype=torch.float64)
    return (b - u @ (u.T @ b)).to(lora_B.dtype)


def project_lora_A(lora_A: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``A' = A (I - V V^T) = A - (A V) V^T``: the update then vanishes on the span of ``V``.

    Args:
        lora_A: ``(r, d_in)``.
        basis: ``V``, ``(d_in, k)`` with orthonormal columns.
    """
    a = lora_A.to(torch.float64)
    v = basis.to(device=a.device, dtype=torch.float64)
    return (a - (a @ v) @ v.T).to(lora_A.dtype)


def update_norm_sq(lora_B: torch.Tensor, lora_A: torch.Tensor) -> float:
    """``||B A||_F^2 = tr((B^T B)(A A^T))`` from two ``(r, r)`` Gram matrices."""
    b = lora_B.to(torch.float64)
    a = lora_A.to(torch.float64)
    return float(((b.T @ b) * (a @ a.T)).sum())


def subspace_energy_fraction(lora_B: torch.Tensor, lora_A: torch.Tensor, basis: torch.Tensor) -> float:
    """``rho = ||U^T B A||_F^2 / ||B A||_F^2``: the share of the update's energy inside ``span(U)``.

    The LoRA scaling cancels. Returns 0.0 for a zero update. A random update scores about
    ``k / d_out`` (method.md section 6).
    """
    total = update_norm_sq(lora_B, lora_A)
    if total == 0.0:
        return 0.0
    ub = basis.to(dtype=torch.float64, device=lora_B.device).T @ lora_B.to(torch.float64)  # (k, r)
    inside = update_norm_sq(ub, lora_A)
    return min(max(inside / total, 0.0), 1.0)
