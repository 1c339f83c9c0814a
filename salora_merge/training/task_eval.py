"""Teacher-forced task metrics on held-out examples: NLL of the target tokens and the model's argmax there.

``token_metrics`` is pure over logits; ``score_examples`` runs a model over tokenized examples in batches.
Comparing two models' argmax at the same positions gives their agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F

from salora_merge.hf.loading import input_device
from salora_merge.training.data import IGNORE, TokenizedExample, pad_batch

__all__ = ["ExampleScore", "token_metrics", "score_examples", "mean_nll", "target_accuracy", "agreement"]


@dataclass(frozen=True)
class ExampleScore:
    nll_sum: float  # summed negative log-likelihood of the learned tokens (nats)
    tokens: int
    predictions: tuple[int, ...]  # argmax at each learned position, in order
    targets: tuple[int, ...]


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> list[ExampleScore]:
    """Per row: NLL sum, count, argmax and targets over positions whose (shifted) label is not ignored.

    ``logits``: ``(B, T, V)``; ``labels``: ``(B, T)`` with ``IGNORE`` for context; the token at ``t+1`` is
    predicted from position ``t``.
    """
    shifted = labels[:, 1:]
    logits = logits[:, :-1].to(torch.float32)
    nll = F.cross_entropy(logits.transpose(1, 2), shifted.clamp_min(0), reduction="none")  # (B, T-1)
    keep = shifted != IGNORE
    argmax = logits.argmax(-1)
    out = []
    for row in range(labels.shape[0]):
        mask = keep[row]
        out.append(ExampleScore(
            nll_sum=float(nll[row][mask].sum()), tokens=int(mask.sum()),
            predictions=tuple(int(t) for t in argmax[row][mask].tolist()),
            targets=tuple(int(t) for t in shifted[row][mask].tolist()),
        ))
    return out


@torch.no_grad()
def score_examples(model: torch.nn.Module, examples: Sequence[TokenizedExample], pad: int,
                   batch_size: int = 8) -> list[ExampleScore]:
    device = input_device(model)
    out: list[ExampleScore] = []
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], pad)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
        labels = batch["labels"]
        out.extend(token_metrics(logits.cpu(), labels))
    return out


def mean_nll(scores: Sequence[ExampleScore]) -> float:
    tokens = sum(s.tokens for s in scores)
    return sum(s.nll_sum for s in scores) / tokens if tokens else float("nan")


def target_accuracy(scores: Sequence[ExampleScore]) -> float:
    """Share of target tokens that are the model's argmax."""
    tokens = sum(s.tokens for s in scores)
    hits = sum(sum(p == t for p, t in zip(s.predictions, s.targets)) for s in scores)
    return hits / tokens if tokens else float("nan")


def agreement(a: Sequence[ExampleScore], b: Sequence[ExampleScore]) -> float:
    """Share of positions where two models' argmax is the same token (same examples, same order)."""
    tokens = sum(s.tokens for s in a)
    same = sum(sum(p == q for p, q in zip(x.predictions, y.predictions)) for x, y in zip(a, b))
    return same / tokens if tokens else float("nan")
