"""SaLoRA training math: initializations, the residual weight, the safety projection, portable export.

Pure functions over tensors (method.md sections 2-4). Per adapted layer: ``W`` is ``(d_out, d_in)``,
the trainable factors are ``A: (r, d_in)``, ``B: (d_out, r)``, the scaling is ``s`` and the fixed safety
module is ``C = I - U_s U_s^T``, never formed: ``C y = y - U_s (U_s^T y)``.

- Initialization: ``(A, B) = (A0, B0)`` and ``W_res = W - s C B0 A0``, so the layer computes ``W x``
  at step 0 (``salora``: ``B0 = U_t U_t^T Ubar_r Sbar_r^{1/2}``, ``A0 = Sbar_r^{1/2} Vbar_r^T``;
  ``pissa``: the same without ``U_t U_t^T``; ``gaussian``: ``A0 = B0 = 0`` with PEFT's default
  random ``A`` and zero ``B``).
- Forward: ``W_res x + s C (B (A x))``.
- Export on the untouched base: ``lora_A = [A ; A0]``, ``lora_B = [C B , -C B0]`` with the same ``s``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "INITS",
    "truncated_svd",
    "salora_init",
    "pissa_init",
    "gaussian_init",
    "residual_weight",
    "project_out",
    "export_factors",
    "export_alpha",
]

INITS = ("salora", "pissa", "gaussian")


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``rank`` singular triplets of ``W`` in float64: ``(Ubar_r (d_out, r), Sbar_r (r,), Vbar_r (d_in, r))``."""
    d_out, d_in = weight.shape
    if not 0 < rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must be between 1 and min(d_out, d_in) = {min(d_out, d_in)}")
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].T


def pissa_init(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A0 = Sbar_r^{1/2} Vbar_r^T``, ``B0 = Ubar_r Sbar_r^{1/2}`` (float64): the principal part of ``W``."""
    u, s, v = truncated_svd(weight, rank)
    root = s.sqrt()
    return root[:, None] * v.T, u * root[None, :]


def salora_init(weight: torch.Tensor, rank: int, task_basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SaLoRA's task-specific initialization (float64).

    Args:
        weight: ``W``, ``(d_out, d_in)``.
        rank: ``r``, the LoRA rank.
        task_basis: ``U_t``, ``(d_out, r_t)`` orthonormal: the top left singular vectors of ``W X_t``
            for the task data's response-token inputs ``X_t``.

    Returns:
        ``(A0, B0)`` with ``A0 = Sbar_r^{1/2} Vbar_r^T`` ``(r, d_in)`` and
        ``B0 = U_t U_t^T Ubar_r Sbar_r^{1/2}`` ``(d_out, r)``.
    """
    if task_basis.shape[0] != weight.shape[0]:
        raise ValueError(f"task basis has {task_basis.shape[0]} rows, the weight has d_out = {weight.shape[0]}")
    a0, b0 = pissa_init(weight, rank)
    ut = task_basis.to(device=b0.device, dtype=torch.float64)
    return a0, ut @ (ut.T @ b0)


def gaussian_init(d_out: int, d_in: int, rank: int, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default LoRA initialization: ``A`` Kaiming-uniform (a = sqrt(5)), ``B = 0``, float32."""
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a (rank, d_in) matrix
    a = (torch.rand(rank, d_in, generator=generator, dtype=torch.float32) * 2.0 - 1.0) * bound
    return a, torch.zeros(d_out, rank, dtype=torch.float32)


def project_out(y: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``C y = y - (y U) U^T`` over the last dimension of ``y`` (``(..., d_out)``); differentiable, never dense."""
    return y - (y @ basis) @ basis.T


def residual_weight(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, safety_basis: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """``W_res = W - s C B0 A0``, computed in float64 and returned in ``weight``'s dtype.

    ``U_s^T W_res = U_s^T W``: the residual keeps the base model's safety features exactly.
    """
    device = weight.device
    u = safety_basis.to(device=device, dtype=torch.float64)
    b0c = project_out(b0.to(device=device, dtype=torch.float64).T, u).T  # C B0, (d_out, r)
    w = weight.to(torch.float64) - scaling * (b0c @ a0.to(device=device, dtype=torch.float64))
    return w.to(weight.dtype)


def export_factors(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor | None, b0: torch.Tensor | None,
                   safety_basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain LoRA factors that reproduce a trained SaLoRA layer on the untouched base (float32).

    ``W + s [C B, -C B0] [A ; A0] = W_res + s C B A``. Without an initial part (``a0 is None``, the
    gaussian initialization) the export keeps rank ``r``: ``(A, C B)``.
    """
    u = safety_basis.to(device=b.device, dtype=torch.float64)
    cb = project_out(b.detach().to(torch.float64).T, u).T
    if a0 is None or b0 is None:
        return a.detach().to(torch.float32).clone(), cb.to(torch.float32)
    cb0 = project_out(b0.to(device=b.device, dtype=torch.float64).T, u).T
    lora_a = torch.cat([a.detach().to(torch.float64), a0.to(device=a.device, dtype=torch.float64)], dim=0)
    lora_b = torch.cat([cb, -cb0], dim=1)
    return lora_a.to(torch.float32), lora_b.to(torch.float32)


def export_alpha(alpha: float, use_rslora: bool, factor: int) -> float:
    """``lora_alpha`` for rank ``factor * rank`` that keeps the scaling ``s`` unchanged.

    ``s = alpha / r`` becomes ``(factor * alpha) / (factor * r)``; with rsLoRA ``s = alpha / sqrt(r)``
    becomes ``(sqrt(factor) * alpha) / sqrt(factor * r)``.
    """
    return alpha * (math.sqrt(factor) if use_rslora else factor)
