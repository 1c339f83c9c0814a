"""Model cards (README.md with YAML front matter) for the folders salora-merge writes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .realign import RealignReport

__all__ = ["adapter_card", "front_matter"]


def front_matter(fields: Mapping[str, Any]) -> str:
    """YAML front matter; values are JSON scalars/lists, which YAML reads as the same values."""
    lines = ["---"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def adapter_card(config: Mapping[str, Any], report: "RealignReport", safety_meta: Mapping[str, Any]) -> str:
    base = report.base_model
    fields = {
        "base_model": base,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": [f"base_model:adapter:{base}", "lora", "salora", "safety"],
    }
    top = sorted(report.modules, key=lambda m: m.energy_removed, reverse=True)[:5]
    rows = "\n".join(
        f"| `{m.module}` | {m.energy_removed:.4f} | {m.random_reference:.4f} |" for m in top
    )
    return (
        front_matter(fields)
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

The full per-module figures are in `salora_realign.json`. Removing the update's component in the
safety subspace is not by itself a measured guarantee of safe behaviour: evaluate refusals on
held-out harmful prompts before deployment.
"""
    )
