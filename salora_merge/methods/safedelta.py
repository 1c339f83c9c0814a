"""``safedelta``: Safe Delta (Lu et al., ICML 2025), closed form, no gradients. Per adapted module, with
``H`` the second moment of the aligned (base) model's inputs on the safety module's calibration data
(harmful prompts with the model's own refusals), accept the adapter's delta entries by safety cost within a
budget and compensate the rest with the optimal-brain-surgeon step (``core/safedelta.py``); the new dense
update is factored back into a LoRA of rank ``--lora-rank`` by truncated SVD, with the energy lost reported.

Accepted entries take their fine-tuned values and every compensation is a combination of the changes made so
far, so each column of the new update lies in the column space of the adapter's ``lora_B``: its rank is at
most the adapter's, and the default ``--lora-rank`` (the adapter's) keeps it exactly."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.errors import SafetyModuleError
from salora_merge.hf.cards import adapter_front_matter
from salora_merge.methods.base import (
    REPAIR_MEASURED,
    Method,
    MethodContext,
    MethodOption,
    at_one_rank,
)
from salora_merge.version import __version__
from salora_merge.readable import Readable

if TYPE_CHECKING:
    from salora_merge.io.adapter import LoraModule


@dataclass(frozen=True)
class SafeDeltaModule:
    module: str
    accepted: float  # share of the delta's entries accepted
    update_norm: float  # ||s B A||_F before
    norm_after: float  # ||dW'||_F of the dense result
    energy_kept_by_lora: float  # share of ||dW'||_F^2 the rank-k factors keep
    safety_error_before: float  # ||dW X^T||^2 / N on the safety inputs (the adapter)
    safety_error_after: float  # the same for the result


@dataclass(frozen=True)
class SafeDeltaReport(Readable):
    base_model: str
    adapter: str
    safety: str
    scale: float
    lora_rank: int
    modules: tuple[SafeDeltaModule, ...]
    output: str

    def to_json(self) -> dict:
        return {**asdict(self), "method": "safedelta", "tool_version": __version__}

    def card(self, adapter_config: Mapping[str, Any]) -> str:
        accepted = sum(m.accepted for m in self.modules) / max(len(self.modules), 1)
        kept = min((m.energy_kept_by_lora for m in self.modules), default=1.0)
        return adapter_front_matter(self.base_model, "lora", "safedelta", "safety") + f"""
# Safe Delta adapter

`{self.adapter}` processed by [salora-merge](https://pypi.org/project/salora-merge/) with Safe Delta (Lu et al.,
ICML 2025): per module, delta entries accepted by safety cost within a budget (scale {self.scale:g}; on average
{accepted:.1%} of the entries), the rest compensated by the optimal-brain-surgeon step on the inputs of the
safety module `{self.safety}`, and the result factored into a rank-{self.lora_rank} LoRA (keeping at least
{kept:.4f} of each module's update energy). Per-module figures in `salora_safedelta.json`.

{REPAIR_MEASURED}
"""

    def render(self) -> str:
        accepted = sum(m.accepted for m in self.modules) / max(len(self.modules), 1)
        kept = min((m.energy_kept_by_lora for m in self.modules), default=1.0)
        return (f"Safe Delta on {self.adapter}: {len(self.modules)} modules, {accepted:.1%} of delta entries "
                f"accepted (scale {self.scale:g}), refactored to rank {self.lora_rank} (energy kept >= {kept:.4f})"
                f"\nWrote {self.output}\n\nNote: {REPAIR_MEASURED}")


def input_moment(safety, name: str, label: str):
    """``H`` of a module's input site under the module's token policy (``calibrate --keep-moments``)."""
    site = safety.sites.get(name)
    policy = safety.metadata.get("token_policy")
    moment = safety.moments.get((site, policy)) if site is not None else None
    if moment is None:
        raise SafetyModuleError(f"{label}: holds no input second moment for {name}; Safe Delta needs them: "
                                "recalibrate with --keep-moments (or let realign calibrate)")
    return moment


def apply_safedelta(modules: Mapping[str, "LoraModule"], ctx: MethodContext,
                    options: Mapping[str, Any]) -> tuple[dict[str, "LoraModule"], SafeDeltaReport]:
    import torch

    from salora_merge.core.lowrank import truncated_factors
    from salora_merge.core.safedelta import safe_delta

    rank = options["lora_rank"] or max(m.rank for m in modules.values())
    factors, reports = {}, []
    for name, module in modules.items():
        h = input_moment(ctx.safety, name, ctx.safety_label).to(torch.float64)
        count = max(int(ctx.safety.counts.get((ctx.safety.sites[name], ctx.safety.metadata.get("token_policy")), 1)), 1)
        w = ctx.base_weight(name)
        delta = module.scaling * (module.lora_B.to(torch.float64) @ module.lora_A.to(torch.float64))
        new_w, mask = safe_delta(w, delta, h, options["scale"], options["damp"], options["exclude"])
        new_delta = new_w - w
        b, a, kept = truncated_factors(new_delta, rank)
        factors[name] = (b, a, 1.0)
        reports.append(SafeDeltaModule(
            module=name, accepted=float(mask.double().mean()), update_norm=float(delta.norm()),
            norm_after=float(new_delta.norm()), energy_kept_by_lora=kept,
            safety_error_before=float(torch.trace(delta @ h @ delta.T)) / count,
            safety_error_after=float(torch.trace(new_delta @ h @ new_delta.T)) / count))
    out = at_one_rank(modules, factors)
    width = next(iter(out.values())).rank
    return out, SafeDeltaReport(base_model=ctx.base_model, adapter=ctx.adapter, safety=ctx.safety_label,
                                scale=options["scale"], lora_rank=width, modules=tuple(reports), output=ctx.output)


METHOD = Method(
    name="safedelta",
    summary="Safe Delta (Lu et al. 2025): keep delta entries by safety cost within a budget, compensate the rest "
            "(OBS), refactor to a LoRA.",
    needs=("safety",),
    apply=apply_safedelta,
    options=(
        MethodOption("scale", float, 1.0, "Safety budget (the reference's s; larger accepts more of the delta).",
                     minimum=0.0),
        MethodOption("lora_rank", int, None, "Rank of the LoRA written [default: the adapter's rank, which keeps "
                     "the result exactly: its columns stay in the span of the adapter's lora_B].",
                     minimum=1),
        MethodOption("damp", float, 0.01, "Dampening of H, as a share of its mean diagonal.", minimum=1e-8,
                     maximum=1.0),
        MethodOption("exclude", float, 0.15, "Share of the most expensive entries never accepted.", minimum=0.0,
                     maximum=1.0),
    ),
    report_name="salora_safedelta.json",
    safety_side=None,
    keep_moments=True,
    rewrites_rank=True,
)
