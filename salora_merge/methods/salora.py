"""``salora``: the SaLoRA projection (Li et al., ICLR 2025), ``lora_B' = lora_B - U_s (U_s^T lora_B)``.

With an input-side safety module it projects ``lora_A`` instead (``A' = A - (A V) V^T``), as realign
always did; ``input-side`` is the same with the side required.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.methods.base import Method, MethodContext

if TYPE_CHECKING:
    from salora_merge.io.adapter import LoraModule
    from salora_merge.realignment.report import RealignReport


def project(modules: Mapping[str, "LoraModule"], ctx: MethodContext,
            options: Mapping[str, Any]) -> tuple[dict[str, "LoraModule"], "RealignReport"]:
    from salora_merge.methods.projection import realign_modules
    from salora_merge.realignment.report import RealignReport

    safety = ctx.safety
    new, reports = realign_modules(modules, safety, ctx.safety_label)
    return new, RealignReport(base_model=ctx.base_model, adapter=ctx.adapter, safety=ctx.safety_label,
                              side=safety.side, rank=safety.rank, modules=tuple(reports), output=ctx.output,
                              safety_metadata=dict(safety.metadata))


METHOD = Method(
    name="salora",
    summary="Project each update off the safety subspace (SaLoRA; the safety module's side, output by default).",
    needs=("safety",),
    apply=project,
)
