"""``both-sides``: ``B' = C B``, then ``A' = A (I - V V^T)``: the output-side projection and the input-side one.

The report gives, per module, the share of ``||dW||^2`` the two together removed and what random
subspaces of the same sizes would remove.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.errors import SafetyModuleError
from salora_merge.methods.base import Method, MethodContext

if TYPE_CHECKING:
    from salora_merge.io.adapter import LoraModule
    from salora_merge.realignment.report import RealignReport


def check_input_module(ctx: MethodContext) -> None:
    if ctx.safety.side != "output":
        raise SafetyModuleError(f"{ctx.safety_label}: --input-safety adds the input side to an output-side module; "
                                "give an output-side --safety")
    if ctx.input_safety.side != "input":
        raise SafetyModuleError(f"{ctx.input_safety_label}: --input-safety must be an input-side module "
                                "(salora-merge calibrate --side input)")


def project_both(modules: Mapping[str, "LoraModule"], ctx: MethodContext,
                 options: Mapping[str, Any]) -> tuple[dict[str, "LoraModule"], "RealignReport"]:
    from salora_merge.methods.projection import both_sides_report, realign_modules
    from salora_merge.realignment.report import RealignReport

    check_input_module(ctx)
    outer, outer_reports = realign_modules(modules, ctx.safety, ctx.safety_label)
    new, inner_reports = realign_modules(outer, ctx.input_safety, ctx.input_safety_label)
    reports = [both_sides_report(o, i, modules[o.module], new[o.module]) for o, i in zip(outer_reports, inner_reports)]
    label = f"{ctx.safety_label} (output) + {ctx.input_safety_label} (input)"
    return new, RealignReport(base_model=ctx.base_model, adapter=ctx.adapter, safety=label, side="both",
                              rank=ctx.safety.rank, modules=tuple(reports), output=ctx.output,
                              safety_metadata=dict(ctx.safety.metadata))


METHOD = Method(
    name="both-sides",
    summary="Project both sides: lora_B off the output-side subspace, then lora_A off the input-side one.",
    needs=("safety", "input_safety"),
    apply=project_both,
    safety_side="output",
)
