"""Weight-space audit: how much of an adapter's update lands in the safety subspace. Pure functions.

Per module ``rho = ||U_s^T dW||_F^2 / ||dW||_F^2`` (output side; ``||dW V_s||^2 / ||dW||^2`` on the input
side), from the LoRA factors without forming ``dW``, next to what a random update of the same shape
would score, ``r_s / d`` (``d = d_out`` on the output side, ``d_in`` on the input side). Summaries are
energy-weighted: the share of the whole update's energy (of a layer, of the adapter) in the subspace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from salora_merge.core.projection import update_norm_sq

__all__ = ["ModuleScore", "GroupScore", "module_scores", "summarize", "by_layer", "standouts", "layer_of"]

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleScore:
    module: str
    rho: float
    random_reference: float
    energy: float  # ||s B A||_F^2 of the update
    rank: int
    safety_rank: int

    @property
    def ratio(self) -> float:
        """rho against a random update's; 1 is chance level, above means aimed at the subspace."""
        return self.rho / self.random_reference if self.random_reference > 0 else float("inf")


@dataclass(frozen=True)
class GroupScore:
    rho: float  # energy-weighted
    random_reference: float  # energy-weighted
    energy: float
    modules: int


def layer_of(module: str) -> int | None:
    """The decoder layer index in a module path (``model.layers.12.self_attn.q_proj`` -> 12)."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def module_scores(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    bases: Mapping[str, torch.Tensor],
    side: str = "output",
) -> list[ModuleScore]:
    """``factors``: module -> (lora_A (r, d_in), lora_B (d_out, r), scaling); ``bases``: module -> U (d, r_s)."""
    scores = []
    for name in sorted(factors):
        lora_A, lora_B, scaling = factors[name]
        basis = bases[name].to(torch.float64)
        a, b = lora_A.to(torch.float64), lora_B.to(torch.float64)
        if side == "input":  # rho of the transposed update: ||dW V||^2 / ||dW||^2
            a, b = b.T, a.T
        if basis.shape[0] != b.shape[0]:
            raise ValueError(f"{name}: basis has {basis.shape[0]} rows, the update {b.shape[0]}")
        total = update_norm_sq(b, a)
        inside = update_norm_sq(basis.T @ b, a) if total > 0 else 0.0
        rho = min(max(inside / total, 0.0), 1.0) if total > 0 else 0.0
        scores.append(ModuleScore(
            module=name, rho=rho, random_reference=basis.shape[1] / basis.shape[0],
            energy=float(scaling) ** 2 * total, rank=int(lora_A.shape[0]), safety_rank=int(basis.shape[1]),
        ))
    return scores


def summarize(scores: Sequence[ModuleScore]) -> GroupScore:
    energy = sum(s.energy for s in scores)
    if energy == 0:
        mean = lambda f: sum(f(s) for s in scores) / len(scores) if scores else 0.0  # noqa: E731
        return GroupScore(mean(lambda s: s.rho), mean(lambda s: s.random_reference), 0.0, len(scores))
    return GroupScore(
        rho=sum(s.rho * s.energy for s in scores) / energy,
        random_reference=sum(s.random_reference * s.energy for s in scores) / energy,
        energy=energy, modules=len(scores),
    )


def by_layer(scores: Sequence[ModuleScore]) -> dict[int | None, GroupScore]:
    groups: dict[int | None, list[ModuleScore]] = {}
    for score in scores:
        groups.setdefault(layer_of(score.module), []).append(score)
    return {layer: summarize(group) for layer, group in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}


def standouts(scores: Sequence[ModuleScore], top: int = 5, min_ratio: float = 2.0) -> list[ModuleScore]:
    """The modules most aimed at the safety subspace: highest rho / reference, at least ``min_ratio``."""
    ranked = sorted(scores, key=lambda s: s.ratio, reverse=True)
    return [s for s in ranked[:top] if s.ratio >= min_ratio]
