"""Salience of a prompt for an adapter: how far the adapter moves the model's next-token distributions over the
first response tokens there (pure functions over logits)."""

from __future__ import annotations

import torch

__all__ = ["response_kl"]


def response_kl(adapter_logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of ``KL(p_adapter || p_base)`` per row.

    ``adapter_logits`` and ``base_logits``: ``(n, t, V)`` at the same positions of the same sequences; ``mask``
    ``(n, t)``, 1 where a position counts (it predicts one of the first response tokens). Computed in float32
    from log-softmax; a row with no counted position scores 0."""
    log_p = torch.log_softmax(adapter_logits.float(), dim=-1)
    log_q = torch.log_softmax(base_logits.float(), dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)  # (n, t); clamp: rounding below 0
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
