"""The objective of re-fitting an adapter (pure): weighted next-token cross-entropy on refusal anchors (the
first response tokens weighted up, as Qi et al. 2024 find refusal decided there), distillation of the
adapter's own behaviour (cross-entropy on its greedy tokens, or a soft cross-entropy on its top-k
next-token distribution, which equals the KL divergence on that support up to a constant), and a proximal
term keeping the factors near where they started."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.nn import functional as F

__all__ = ["IGNORE", "token_weights", "cross_entropy_weight", "weighted_cross_entropy", "soft_cross_entropy", "proximal_penalty"]

IGNORE = -100


def token_weights(labels: list[int], first_tokens: int, first_weight: float) -> list[float]:
    """Per position: 0 for context, ``first_weight`` for the first ``first_tokens`` learned tokens, 1 after."""
    out, seen = [], 0
    for label in labels:
        if label == IGNORE:
            out.append(0.0)
        else:
            out.append(first_weight if seen < first_tokens else 1.0)
            seen += 1
    return out


def cross_entropy_weight(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t`` over the learned positions: :func:`weighted_cross_entropy`'s own denominator."""
    return (weights[:, 1:].float() * (labels[:, 1:] != IGNORE)).sum()


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           denominator: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t w_t * CE(logits_{t-1}, labels_t) / sum_t w_t`` over the batch (``logits (B, T, V)``, labels and
    weights ``(B, T)``, the label at ``t`` predicted from position ``t - 1``). ``denominator`` replaces ``sum_t
    w_t`` (data-parallel runs divide by the sum over every process's batch)."""
    shifted = logits[:, :-1].float()
    target, w = labels[:, 1:], weights[:, 1:].to(shifted.dtype)
    losses = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1).clamp_min(0),
                             reduction="none").reshape(target.shape)
    w = w * (target != IGNORE)
    return (losses * w).sum() / (w.sum() if denominator is None else denominator).clamp_min(1e-12)


def soft_cross_entropy(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_probs: torch.Tensor,
                       weights: torch.Tensor, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """``-sum_k p_k log q(id_k)`` per position, averaged with ``weights (B, T)`` (a boolean mask or per-position
    weights): the teacher's top-k next-token distribution (``teacher_ids``, ``teacher_probs (B, T, k)``,
    renormalized over the k ids, aligned with ``logits``' positions) against the student's
    ``log_softmax(logits)``. ``denominator`` replaces the weights' sum, as in :func:`weighted_cross_entropy`."""
    logq = F.log_softmax(logits.float(), dim=-1).gather(-1, teacher_ids)
    p = teacher_probs / teacher_probs.sum(-1, keepdim=True).clamp_min(1e-12)
    per_position = -(p * logq).sum(-1)
    w = weights.to(per_position.dtype)
    return (per_position * w).sum() / (w.sum() if denominator is None else denominator).clamp_min(1e-12)


def proximal_penalty(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum ||p - p0||_F^2`` over (parameter, starting value) pairs (summed on the first pair's device, as the
    parameters of a model spread over GPUs live on several)."""
    total = None
    for param, start in pairs:
        term = (param - start.to(param.dtype)).pow(2).sum()
        total = term if total is None else total + term.to(total.device)
    return total if total is not None else torch.zeros(())
