"""Safe Delta (Lu et al., ICML 2025) for one linear layer, pure over tensors.

Start from the aligned weight ``W`` and the fine-tuned one ``W + delta``. With ``H = X^T X`` of the aligned
layer's inputs on safety data (harmful prompts with the aligned model's refusals), column ``m`` has the
sequential inverse-Hessian diagonal ``h_m = [H_(m)^-1]_00`` (``H_(m)`` being ``H`` restricted to columns
``m..d_in``; with the upper Cholesky factor ``U`` of ``H^-1``, ``h_m = U_mm^2``). Accepting the entry
``delta_im`` costs ``delta_im^2 / h_m`` of safety (the optimal-brain-surgeon increase of the output error on
the safety inputs) and gains ``delta_im^2`` of the fine-tune; the greedy knapsack order is the gain per cost,
``h_m`` (largest first). Entries are accepted in that order while the summed cost stays within the budget;
the most expensive ``exclude`` share (by ``1 / h_m``) is never accepted. Then, column by column, each
column is set to its accepted fine-tuned entries and its current value elsewhere, and the difference to the
current value is compensated on the later columns through ``U`` (SparseGPT's update), so that the layer's
outputs on the safety inputs move as little as possible.
"""

from __future__ import annotations

import torch

__all__ = ["inverse_cholesky", "safety_costs", "select_entries", "safe_delta", "BUDGET_REFERENCE"]

# The budget is ``scale * mean(1 / h) * d_out * d_in / BUDGET_REFERENCE``: the reference implementation's
# per-block budget (``mean * scale / 2`` for a 4096 x 1024 block), extended to any layer size.
BUDGET_REFERENCE = 4096 * 2048


def inverse_cholesky(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (``U^T U = H^-1``), in float64.
    Columns never seen (zero diagonal) get a unit diagonal first."""
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0])
    h[idx, idx] += damp * torch.diagonal(h).mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def safety_costs(delta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``delta_im^2 / h_m`` per entry, ``h_m = U_mm^2``."""
    return delta.to(torch.float64) ** 2 / (torch.diagonal(u) ** 2)[None, :]


def select_entries(delta: torch.Tensor, u: torch.Tensor, scale: float, exclude: float = 0.15) -> torch.Tensor:
    """The accepted entries (bool, ``delta``'s shape): greedy by ``h_m`` (gain per cost), the most expensive
    ``exclude`` share left out, while the summed cost is at most the budget."""
    d_out, d_in = delta.shape
    per_cost = (1.0 / torch.diagonal(u) ** 2)[None, :].expand(d_out, d_in).flatten()
    costs = safety_costs(delta, u).flatten()
    order = torch.argsort(per_cost, stable=True)  # cheapest per unit of gain first; ties in row-major order
    keep = order[: order.numel() - int(exclude * order.numel())]
    budget = scale * float(per_cost.mean()) * d_out * d_in / BUDGET_REFERENCE
    accepted = torch.cumsum(costs[keep], dim=0) <= budget
    mask = torch.zeros(d_out * d_in, dtype=torch.bool)
    mask[keep[accepted]] = True
    return mask.reshape(d_out, d_in)


def safe_delta(w_aligned: torch.Tensor, delta: torch.Tensor, h: torch.Tensor, scale: float, damp: float = 0.01,
               exclude: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """The new weight (float64) and the accepted-entry mask, for ``W (d_out, d_in)``, ``delta`` and
    ``H (d_in, d_in)``."""
    u = inverse_cholesky(h, damp)
    mask = select_entries(delta, u, scale, exclude)
    w = w_aligned.to(torch.float64).clone()
    target = w_aligned.to(torch.float64) + delta.to(torch.float64)
    for m in range(w.shape[1]):
        column = w[:, m]
        chosen = torch.where(mask[:, m], target[:, m], column)
        error = (column - chosen) / u[m, m]
        w[:, m] = chosen
        w[:, m + 1:] -= error[:, None] * u[m, m + 1:][None, :]
    return w, mask
