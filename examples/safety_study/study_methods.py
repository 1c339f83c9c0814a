"""The study's post-hoc methods, each a function from LoRA modules to LoRA modules, built from the product's own
pure functions (``realign_modules``, ``safelora_modules``, ``random_control``, ``shrink_modules``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from salora_merge.core.projection import update_norm_sq
from salora_merge.core.safety import SafetyModule, random_control
from salora_merge.io.adapter import LoraModule
from salora_merge.methods.projection import realign_modules
from salora_merge.methods.safelora import safelora_modules
from salora_merge.methods.shrink import shrink_modules

Modules = Mapping[str, LoraModule]


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    apply: Callable[[Modules], dict[str, LoraModule]]


def safety_module(bases: Mapping[str, torch.Tensor], side: str, label: str) -> SafetyModule:
    rank = max(int(b.shape[1]) for b in bases.values())
    return SafetyModule(bases=dict(bases), eigenvalues={n: torch.zeros(b.shape[1], dtype=torch.float64)
                                                        for n, b in bases.items()},
                        side=side, metadata={"rank": rank, "method": label})


def truncate(bases: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {n: b[:, :rank].contiguous() for n, b in bases.items()}


def project(safety: SafetyModule) -> Callable[[Modules], dict[str, LoraModule]]:
    def apply(modules: Modules) -> dict[str, LoraModule]:
        return realign_modules({n: modules[n] for n in modules}, safety)[0]
    return apply


def both_sides(output: SafetyModule, inner: SafetyModule) -> Callable[[Modules], dict[str, LoraModule]]:
    def apply(modules: Modules) -> dict[str, LoraModule]:
        return realign_modules(realign_modules(dict(modules), output)[0], inner)[0]
    return apply


def safelora(alignments: Mapping[str, torch.Tensor], threshold: float | None, top_k: int | None
             ) -> Callable[[Modules], dict[str, LoraModule]]:
    def apply(modules: Modules) -> dict[str, LoraModule]:
        return safelora_modules(dict(modules), alignments, threshold, top_k)[0]
    return apply


def shrink(factor: float) -> Callable[[Modules], dict[str, LoraModule]]:
    def apply(modules: Modules) -> dict[str, LoraModule]:
        return shrink_modules(modules, factor)[0]
    return apply


def energy_kept(before: Modules, after: Modules) -> float:
    """``sum ||dW'||^2 / sum ||dW||^2`` over the adapter's modules."""
    total = sum(m.scaling**2 * update_norm_sq(m.lora_B, m.lora_A) for m in before.values())
    kept = sum(m.scaling**2 * update_norm_sq(m.lora_B, m.lora_A) for m in after.values())
    return kept / total if total else 1.0


def methods(bases: Mapping[str, Mapping[str, torch.Tensor]], alignments: Mapping[str, torch.Tensor],
            ranks: tuple[int, ...], energy: float, safelora_threshold: float, safelora_top_k: int,
            seed: int) -> dict[str, Method]:
    """Every method of the study, keyed. ``bases`` holds the derived bases by family (see study.derive_bases)."""
    out: dict[str, Method] = {"none": Method("none", "no realign (the eroded adapter)", lambda m: dict(m))}
    top = max(ranks)
    for r in ranks:
        out[f"salora-r{r}"] = Method(f"salora-r{r}", f"SaLoRA output side, response tokens, r_s={r}",
                                     project(safety_module(truncate(bases["response"], r), "output", "response")))
        out[f"random-r{r}"] = Method(f"random-r{r}", f"random control, r_s={r}",
                                     project(random_control(safety_module(truncate(bases["response"], r), "output",
                                                                          "response"), seed)))
    mid = sorted(ranks)[len(ranks) // 2]
    out[f"energy-{energy:g}"] = Method(f"energy-{energy:g}", f"rank by energy {energy:g} (cap {top})",
                                       project(safety_module(bases["energy"], "output", "energy")))
    for policy in ("prompt", "last_prompt", "all"):
        out[f"{policy}-r{mid}"] = Method(f"{policy}-r{mid}", f"output side, {policy} tokens, r_s={mid}",
                                         project(safety_module(bases[policy], "output", policy)))
    for r in (mid, top):
        out[f"contrast-r{r}"] = Method(f"contrast-r{r}", f"contrastive (harmful vs benign), r_s={r}",
                                       project(safety_module(truncate(bases["contrast"], r), "output", "contrast")))
    out[f"input-r{mid}"] = Method(f"input-r{mid}", f"input side, response tokens, r={mid}",
                                  project(safety_module(bases["input"], "input", "input")))
    out[f"both-r{mid}"] = Method(f"both-r{mid}", f"both sides, r_s={mid} + r={mid}",
                                 both_sides(safety_module(truncate(bases["response"], mid), "output", "response"),
                                            safety_module(bases["input"], "input", "input")))
    out["delta"] = Method("delta", f"alignment-delta subspace (top {next(iter(bases['delta'].values())).shape[1]} left singular vectors "
                                   "of W_aligned - W_original)",
                          project(safety_module(bases["delta"], "output", "delta")))
    out[f"safelora-t{safelora_threshold:g}"] = Method(
        f"safelora-t{safelora_threshold:g}", f"Safe LoRA, threshold {safelora_threshold:g}",
        safelora(alignments, safelora_threshold, None))
    out[f"safelora-k{safelora_top_k}"] = Method(
        f"safelora-k{safelora_top_k}", f"Safe LoRA, top {safelora_top_k} modules", safelora(alignments, None, safelora_top_k))
    out["shrink-0.5"] = Method("shrink-0.5", "scale the update by 0.5 (no subspace)", shrink(0.5))
    return out
