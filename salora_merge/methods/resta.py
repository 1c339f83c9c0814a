"""``resta``: add the safety vector back (RESTA, Bhardwaj et al., ACL 2024): for every adapted module,
``dW' = dW + gamma (W_aligned - W_unaligned)``, the safety vector as a rank-``--vector-rank`` term found by
truncated SVD (exact when the pair differs by a low-rank update). The adapter is written with rank
``r + vector_rank`` and scaling 1: ``lora_B' = [s B, Vb]``, ``lora_A' = [A; Va]``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

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
class RestaModule:
    module: str
    vector_norm: float  # ||V||_F
    vector_energy_kept: float  # share of ||V||_F^2 the rank-k term keeps
    update_norm: float  # ||s B A||_F before


@dataclass(frozen=True)
class RestaReport(Readable):
    base_model: str
    adapter: str
    aligned: str
    unaligned: str
    gamma: float
    vector_rank: int
    rank: int  # of the written adapter
    modules: tuple[RestaModule, ...]
    output: str

    def to_json(self) -> dict:
        return {**asdict(self), "method": "resta", "tool_version": __version__}

    def card(self, adapter_config: Mapping[str, Any]) -> str:
        kept = min(m.vector_energy_kept for m in self.modules) if self.modules else 1.0
        return adapter_front_matter(self.base_model, "lora", "resta", "safety") + f"""
# LoRA adapter with the safety vector added back (RESTA)

`{self.adapter}` processed by [salora-merge](https://pypi.org/project/salora-merge/) with RESTA (Bhardwaj et
al., ACL 2024): for each of its {len(self.modules)} modules, `dW' = dW + {self.gamma:g} (W_aligned - W_unaligned)`
(`{self.aligned}` minus `{self.unaligned}`), the safety vector as a rank-{self.vector_rank} term (it keeps at
least {kept:.4f} of each module's safety-vector energy). Written as a rank-{self.rank} LoRA with scaling 1;
per-module figures in `salora_resta.json`.

{REPAIR_MEASURED}
"""

    def render(self) -> str:
        kept = min(m.vector_energy_kept for m in self.modules) if self.modules else 1.0
        return (f"RESTA on {self.adapter}: added {self.gamma:g} x ({self.aligned} - {self.unaligned}) to "
                f"{len(self.modules)} modules as a rank-{self.vector_rank} term (energy kept >= {kept:.4f}); "
                f"adapter rank {self.rank}\nWrote {self.output}\n\nNote: {REPAIR_MEASURED}")


def apply_resta(modules: Mapping[str, "LoraModule"], ctx: MethodContext,
                options: Mapping[str, Any]) -> tuple[dict[str, "LoraModule"], RestaReport]:
    from salora_merge.core.projection import update_norm_sq
    from salora_merge.core.resta import safety_vector_factors, with_safety_vector

    gamma, k = options["gamma"], options["vector_rank"]
    combined, reports = {}, []
    for name, module in modules.items():
        v = ctx.alignments[name]
        vb, va, kept = safety_vector_factors(v, gamma, k)
        combined[name] = (*with_safety_vector(module.lora_B, module.lora_A, module.scaling, vb, va), 1.0)
        reports.append(RestaModule(module=name, vector_norm=float(v.norm()), vector_energy_kept=kept,
                                   update_norm=abs(module.scaling) * update_norm_sq(module.lora_B, module.lora_A) ** 0.5))
    out = at_one_rank(modules, combined)
    rank = next(iter(out.values())).rank
    return out, RestaReport(base_model=ctx.base_model, adapter=ctx.adapter, aligned=ctx.aligned,
                            unaligned=ctx.unaligned, gamma=gamma, vector_rank=k, rank=rank, modules=tuple(reports),
                            output=ctx.output)


METHOD = Method(
    name="resta",
    summary="RESTA (Bhardwaj et al. 2024): add gamma (W_aligned - W_unaligned) back, as a low-rank term.",
    needs=("alignment",),
    apply=apply_resta,
    options=(
        MethodOption("gamma", float, 0.5, "Scale of the safety vector added back.", minimum=0.0, maximum=4.0),
        MethodOption("vector_rank", int, 16, "Rank of the safety-vector term (truncated SVD).", minimum=1),
    ),
    report_name="salora_resta.json",
    rewrites_rank=True,
)
