"""Projection of LoRA factors through safety bases, shared by the projection methods (pure over tensors)."""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from salora_merge.core.projection import (
    project_lora_A,
    project_lora_B,
    subspace_energy_fraction,
    update_norm_sq,
)
from salora_merge.core.safety import SafetyModule
from salora_merge.errors import SafetyModuleError
from salora_merge.io.adapter import LoraModule
from salora_merge.realignment.report import ModuleReport

__all__ = ["realign_modules", "both_sides_report"]


def realign_modules(
    modules: Mapping[str, LoraModule], safety: SafetyModule, source: str = "safety module"
) -> tuple[dict[str, LoraModule], list[ModuleReport]]:
    """Project every module's LoRA factors through its safety basis. Pure over loaded tensors.

    Output side: ``B' = B - U_s (U_s^T B)``; input side: ``A' = A - (A V) V^T``. Rank, ``A`` (or
    ``B``) and scaling are unchanged.
    """
    out: dict[str, LoraModule] = {}
    reports: list[ModuleReport] = []
    for name, module in modules.items():
        if name not in safety.bases:
            suffix = name.rsplit(".", 1)[-1]
            raise SafetyModuleError(
                f"{source} has no safety basis for {name}; recalibrate with --targets including {suffix}"
            )
        basis = safety.bases[name]
        factor = module.lora_B if safety.side == "output" else module.lora_A.T
        if basis.shape[0] != factor.shape[0]:
            raise SafetyModuleError(
                f"{source}: basis for {name} has {basis.shape[0]} rows but the adapter's "
                f"{'lora_B' if safety.side == 'output' else 'lora_A'} has {factor.shape[0]}"
            )
        if safety.side == "output":
            removed = subspace_energy_fraction(module.lora_B, module.lora_A, basis)
            new = replace(module, lora_B=project_lora_B(module.lora_B, basis))
        else:
            # rho of the transposed update: ||dW V||^2 / ||dW||^2.
            removed = subspace_energy_fraction(module.lora_A.T, module.lora_B.T, basis)
            new = replace(module, lora_A=project_lora_A(module.lora_A, basis))
        out[name] = new
        norm = abs(module.scaling) * update_norm_sq(module.lora_B, module.lora_A) ** 0.5
        reports.append(ModuleReport(
            module=name, rank=module.rank, safety_rank=int(basis.shape[1]), d_out=int(module.lora_B.shape[0]),
            scaling=module.scaling, update_norm=norm, energy_removed=removed,
            random_reference=int(basis.shape[1]) / int(basis.shape[0]),
        ))
    return out, reports


def both_sides_report(outer: ModuleReport, inner: ModuleReport, before: LoraModule, after: LoraModule) -> ModuleReport:
    """One module's figures after projecting both sides: the share of ``||dW||^2`` removed in total, and
    what random subspaces of the same sizes would remove, ``1 - (1 - r_s/d_out)(1 - r_v/d_in)``."""
    total = update_norm_sq(before.lora_B, before.lora_A)
    kept = update_norm_sq(after.lora_B, after.lora_A) / total if total > 0 else 1.0
    reference = 1.0 - (1.0 - outer.random_reference) * (1.0 - inner.random_reference)
    return replace(outer, safety_rank=outer.safety_rank + inner.safety_rank, energy_removed=1.0 - kept,
                   random_reference=reference)


