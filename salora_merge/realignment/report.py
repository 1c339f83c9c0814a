"""The projection methods' report (per-module figures), its card and its terminal summary."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from salora_merge.hf.cards import adapter_front_matter
from salora_merge.version import __version__
from salora_merge.readable import Readable

__all__ = ["ModuleReport", "RealignReport", "adapter_card", "render_realign", "REPORT_NAME", "REALIGN_CAVEAT"]

REPORT_NAME = "salora_realign.json"

# What the safety study (docs/safety-study.md) measured; cards and realign's summary say it instead of
# promising safety the projection did not give.
REALIGN_CAVEAT = (
    "Removing the update's component in the safety subspace is a constraint on the weights, not a measured "
    "guarantee of safe behaviour. In salora-merge's safety study (`docs/safety-study.md` in its source) on "
    "SmolLM2-135M-Instruct, this "
    "projection restored no more of an eroded adapter's refusals than projecting off a random subspace of the "
    "same size, at every rank tried (8, 32, 128), and no method tried (token policies, contrastive and "
    "input-side subspaces, Safe LoRA) brought an eroded adapter back to 90% of the aligned model's refusal "
    "rate while keeping 80% of its task improvement. Measure refusals on held-out harmful prompts "
    "(`salora-merge audit --behavior`) before deployment."
)

@dataclass(frozen=True)
class ModuleReport:
    module: str
    rank: int
    safety_rank: int
    d_out: int
    scaling: float
    update_norm: float  # ||s B A||_F before
    energy_removed: float  # share of ||dW||_F^2 removed (rho before realign)
    random_reference: float  # what a random update of this shape would lose: r_s / d


@dataclass(frozen=True)
class RealignReport(Readable):
    base_model: str
    adapter: str
    safety: str
    side: str
    rank: int
    modules: tuple[ModuleReport, ...]
    output: str
    # the safety module's metadata, for the card (not part of the JSON report)
    safety_metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total_energy_removed(self) -> float:
        """Removed share of the whole adapter's energy: sum ||U^T dW||^2 / sum ||dW||^2."""
        total = sum(m.update_norm**2 for m in self.modules)
        return sum(m.update_norm**2 * m.energy_removed for m in self.modules) / total if total else 0.0

    def card(self, adapter_config: Mapping[str, Any]) -> str:
        return adapter_card(adapter_config, self, self.safety_metadata)

    def render(self) -> str:
        return render_realign(self)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["safety_metadata"]
        data["total_energy_removed"] = self.total_energy_removed
        data["tool_version"] = __version__
        return data


def adapter_card(config: Mapping[str, Any], report: RealignReport, safety_meta: Mapping[str, Any]) -> str:
    base = report.base_model
    top = sorted(report.modules, key=lambda m: m.energy_removed, reverse=True)[:5]
    rows = "\n".join(
        f"| `{m.module}` | {m.energy_removed:.4f} | {m.random_reference:.4f} |" for m in top
    )
    return (
        adapter_front_matter(base, "lora", "salora", "safety")
        + f"""
# Realigned LoRA adapter

This adapter is `{report.adapter}` re-projected by
[salora-merge](https://pypi.org/project/salora-merge/) so that it cannot move the {report.side}-side
safety features of `{base}`: for every adapted module, `lora_B' = lora_B - U_s (U_s^T lora_B)`
(output side) with `U_s` the top-{report.rank} safety basis computed from calibration prompts
(SaLoRA, Li et al., ICLR 2025). Rank, `lora_A`, scaling and config are unchanged; it loads with
PEFT like the original.

- Safety module: `{report.safety}` (prompts `{safety_meta.get('prompt_set')}`, token policy
  `{safety_meta.get('token_policy')}`, {safety_meta.get('n_prompts')} prompts, {safety_meta.get('n_tokens')} tokens)
- Modules realigned: {len(report.modules)}
- Share of the update's energy removed: {report.total_energy_removed:.4f}

Modules that lost the largest share (a random update would lose about the reference):

| module | energy removed | random reference |
|---|---|---|
{rows}

The full per-module figures are in `salora_realign.json`.

{REALIGN_CAVEAT}
"""
    )



def render_realign(report: RealignReport, top: int = 5) -> str:
    """Per-module-kind summary, the modules that lost most, totals, and where the output is."""
    by_kind: dict[str, list] = defaultdict(list)
    for m in report.modules:
        by_kind[m.module.rsplit(".", 1)[-1]].append(m)
    lines = [
        f"Realigned {len(report.modules)} modules of {report.adapter} against {report.base_model} "
        f"({report.side} side, r_s = {report.rank}; safety module: {report.safety})",
        "",
        f"{'module kind':<16}{'count':>6}{'mean removed':>14}{'max removed':>13}{'random ref':>12}",
    ]
    for kind in sorted(by_kind):
        ms = by_kind[kind]
        mean = sum(m.energy_removed for m in ms) / len(ms)
        lines.append(
            f"{kind:<16}{len(ms):>6}{mean:>14.4f}{max(m.energy_removed for m in ms):>13.4f}"
            f"{ms[0].random_reference:>12.4f}"
        )
    lines.append("")
    lines.append("Largest shares removed:")
    for m in sorted(report.modules, key=lambda m: m.energy_removed, reverse=True)[:top]:
        lines.append(f"  {m.module:<48} {m.energy_removed:.4f}")
    lines += [
        "",
        f"Energy of the whole update removed: {report.total_energy_removed:.4f}",
        f"Wrote {report.output} (per-module figures in {REPORT_NAME})",
        "",
        "Note: this is a constraint on the weights, not a measured safety guarantee. In the safety study "
        "(docs/safety-study.md) it restored no more refusals than a random subspace of the same size; "
        "measure refusals with `salora-merge audit --behavior` before deployment.",
    ]
    return "\n".join(lines)
