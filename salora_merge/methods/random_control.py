"""``random``: the control. The same projection through random orthonormal subspaces of the safety
module's sizes (seeded), so that any effect of the safety subspace can be told from a rank effect."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.methods.base import Method, MethodContext, MethodOption
from salora_merge.methods.both_sides import project_both
from salora_merge.methods.salora import project

if TYPE_CHECKING:
    from salora_merge.io.adapter import LoraModule
    from salora_merge.realignment.report import RealignReport


def project_random(modules: Mapping[str, "LoraModule"], ctx: MethodContext,
                   options: Mapping[str, Any]) -> tuple[dict[str, "LoraModule"], "RealignReport"]:
    from salora_merge.core.safety import random_control

    seed = options["seed"]
    label = f"random control (seed {seed}) shaped like {ctx.safety_label}"
    ctx = replace(ctx, safety=random_control(ctx.safety, seed), safety_label=label)
    if ctx.input_safety is None:
        return project(modules, ctx, options)
    ctx = replace(ctx, input_safety=random_control(ctx.input_safety, seed + 1))
    return project_both(modules, ctx, options)


METHOD = Method(
    name="random",
    summary="The control: the same projection through random subspaces of the safety module's sizes.",
    needs=("safety",),
    optional=("input_safety",),
    apply=project_random,
    options=(MethodOption("seed", int, 0, "Seed of the random subspaces (the input side uses seed + 1).",
                          minimum=0, maximum=2**63 - 1),),
)
