"""The weighted training objective shared by ``refit`` (repair) and anchored ``train``/``retrain``: items that
carry a cross-entropy weight per position (and, for KL distillation, a teacher's top-k distribution), the
collator that pads them, and the loss over a batch (``core/refit_loss.py``'s terms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import salora_merge.parallel as parallel
from salora_merge.core.refit_loss import (
    cross_entropy_weight,
    proximal_penalty,
    soft_cross_entropy,
    weighted_cross_entropy,
)
from salora_merge.training.data import TokenizedExample, pad_batch

__all__ = ["WeightedItem", "weighted_collate", "weighted_loss"]


@dataclass(frozen=True)
class WeightedItem:
    example: TokenizedExample
    weights: list[float]  # cross-entropy weight per position (0: none)
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, probs) (T, k) at the predicting positions
    teacher_weights: list[float] | None = None  # weight per predicting position (T) of the teacher's distribution


def weighted_collate(pad: int, k: int) -> Callable[[Sequence[WeightedItem]], dict[str, torch.Tensor]]:
    """Right-padded batches of ``WeightedItem`` with their weights (and teachers' top-``k``, zeros without)."""
    def collate(items: Sequence[WeightedItem]) -> dict[str, torch.Tensor]:
        batch = pad_batch([i.example for i in items], pad)
        n, width = batch["input_ids"].shape
        batch.update(weights=torch.zeros((n, width)), teacher_ids=torch.zeros((n, width, k), dtype=torch.long),
                     teacher_probs=torch.zeros((n, width, k)), teacher_weights=torch.zeros((n, width)))
        for row, item in enumerate(items):
            t = len(item.example.input_ids)
            batch["weights"][row, :t] = torch.tensor(item.weights)
            if item.teacher is not None:
                ids, probs = item.teacher
                batch["teacher_ids"][row, :t] = ids
                batch["teacher_probs"][row, :t] = probs
                batch["teacher_weights"][row, :t] = torch.tensor(item.teacher_weights) * (probs.sum(-1) > 0)
        return batch
    return collate


def weighted_loss(kl: bool = False, proximal: float = 0.0,
                  starts: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
                  ) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """``loss(model, batch)``: the weighted cross-entropy, plus the teachers' soft cross-entropy with ``kl``,
    plus ``proximal * sum ||p - p0||^2`` over ``starts``. Each term is a weighted mean over the whole step's
    batch: under torchrun the weights are summed over the processes and each process's share scaled by their
    number, so that DDP's mean of the gradients is the gradient one process would take on the whole batch (and
    the logged loss, a mean over processes, too)."""
    def loss(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        # Under --device-map the logits come out on the last layer's device, the batch is on the first's.
        batch = {key: v.to(out.logits.device) for key, v in batch.items()}
        sums = torch.stack([cross_entropy_weight(batch["labels"], batch["weights"]),
                            batch["teacher_weights"].float().sum()])
        world = parallel.world_size()
        if world > 1:
            sums = parallel.all_reduce_sum_(sums.detach().clone()) / world
        value = weighted_cross_entropy(out.logits, batch["labels"], batch["weights"], sums[0])
        if kl and bool(sums[1] > 0):
            value = value + soft_cross_entropy(out.logits, batch["teacher_ids"], batch["teacher_probs"],
                                               batch["teacher_weights"], sums[1])
        if proximal > 0:
            value = value + proximal * proximal_penalty(starts).to(value.device)
        return value
    return loss
