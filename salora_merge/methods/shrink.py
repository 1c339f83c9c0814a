"""``shrink``: scale every update by ``gamma`` (``lora_B' = gamma lora_B``). The control that draws the
trade-off curve every other method is compared with (docs/safety-study.md): a method counts only where it
restores more refusals than shrinking does at the same task kept."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.hf.cards import adapter_front_matter
from salora_merge.methods.base import Method, MethodContext, MethodOption
from salora_merge.version import __version__
from salora_merge.readable import Readable

if TYPE_CHECKING:
    from salora_merge.io.adapter import LoraModule
    from salora_merge.realignment.report import ModuleReport

SHRINK_NOTE = (
    "Scaling the update down is the control of salora-merge's safety study (`docs/safety-study.md` in its "
    "source): on SmolLM2-135M-Instruct every projection it tried lay on the curve this traces, trading task "
    "improvement for refusals. Measure refusals on held-out harmful prompts (`salora-merge audit --behavior`) "
    "and the adapter's task before deployment."
)


@dataclass(frozen=True)
class ShrinkReport(Readable):
    base_model: str
    adapter: str
    gamma: float
    modules: tuple["ModuleReport", ...]  # energy_removed = 1 - gamma^2 for every module
    output: str

    def to_json(self) -> dict:
        return {**asdict(self), "method": "shrink", "tool_version": __version__}

    def card(self, adapter_config: Mapping[str, Any]) -> str:
        return adapter_front_matter(self.base_model, "lora", "salora", "shrink") + f"""
# Shrunk LoRA adapter

`{self.adapter}` with every update scaled by gamma = {self.gamma:g} (`lora_B' = gamma lora_B`) by
[salora-merge](https://pypi.org/project/salora-merge/): {len(self.modules)} modules, rank, `lora_A` and
config unchanged; the update keeps {self.gamma ** 2:.4f} of its energy.

{SHRINK_NOTE}
"""

    def render(self) -> str:
        return (f"Scaled the update of {len(self.modules)} modules of {self.adapter} by gamma = {self.gamma:g} "
                f"(energy kept {self.gamma ** 2:.4f})\nWrote {self.output}")


def shrink_modules(modules: Mapping[str, "LoraModule"], gamma: float) -> tuple[dict[str, "LoraModule"], list]:
    """``lora_B' = gamma lora_B`` for every module, with per-module figures (energy removed ``1 - gamma^2``)."""
    from salora_merge.core.projection import update_norm_sq
    from salora_merge.realignment.report import ModuleReport

    removed = 1.0 - gamma * gamma
    out, reports = {}, []
    for name, module in modules.items():
        out[name] = replace(module, lora_B=(module.lora_B * gamma).to(module.lora_B.dtype))
        norm = abs(module.scaling) * update_norm_sq(module.lora_B, module.lora_A) ** 0.5
        reports.append(ModuleReport(module=name, rank=module.rank, safety_rank=0, d_out=int(module.lora_B.shape[0]),
                                    scaling=module.scaling, update_norm=norm, energy_removed=removed,
                                    random_reference=removed))
    return out, reports


def shrink(modules: Mapping[str, "LoraModule"], ctx: MethodContext,
           options: Mapping[str, Any]) -> tuple[dict[str, "LoraModule"], ShrinkReport]:
    out, reports = shrink_modules(modules, options["gamma"])
    return out, ShrinkReport(base_model=ctx.base_model, adapter=ctx.adapter, gamma=options["gamma"],
                             modules=tuple(reports), output=ctx.output)


METHOD = Method(
    name="shrink",
    summary="The control that draws the trade-off curve: scale every update by --gamma.",
    needs=(),
    apply=shrink,
    options=(MethodOption("gamma", float, 0.5, "Scale of the update (lora_B' = gamma lora_B).",
                          minimum=0.0, maximum=1.0),),
)
