"""The model card (README.md) of a merged checkpoint: Hub metadata and what was merged, how, with figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.hf.cards import base_license, hub_card, is_hub_id
from salora_merge.merging.provenance import redo_command
from salora_merge.realignment.report import REALIGN_CAVEAT
from salora_merge.version import __version__

if TYPE_CHECKING:
    from salora_merge.merging.report import MergeReport

__all__ = ["merged_card"]


def merged_card(report: "MergeReport", base, audit: Mapping[str, Any] | None = None) -> str:
    """README.md of a merged model: Hub metadata (ModelCardData) and what was merged, how, with figures."""
    license_ = base_license(base)
    prior = [a for a in report.adapters if a.get("realigned_before")]
    data = dict(
        base_model=report.base_model if is_hub_id(report.base_model) else None,
        base_model_relation="merge",
        library_name="transformers",
        license=license_,
        pipeline_tag="text-generation",
        tags=["salora", "safety", "lora", "merge"] + (["realigned"] if report.realign or prior else []),
    )
    adapters = "\n".join(
        f"| `{a['ref']}` | {a['weight']:g} | {a['modules']} | {', '.join(a['modules_to_save']) or '-'} |"
        for a in report.adapters
    )
    if report.realign:
        safety = report.safety or {}
        rows = "\n".join(f"| `{r['adapter']}` | {r['total_energy_removed']:.4f} | {len(r['modules'])} |"
                         for r in report.realign)
        realign = f"""Before merging, every adapter was **realigned** (SaLoRA, Li et al., ICLR 2025): its update was
projected off the base model's {safety.get('side', 'output')}-side safety subspace (rank
{safety.get('rank')}, from {safety.get('n_prompts')} calibration prompts of `{safety.get('prompt_set')}`,
token policy `{safety.get('token_policy')}`), so `U_s^T W' x = U_s^T W x` on that subspace.

| adapter | share of update energy removed | modules |
|---|---|---|
{rows}
"""
    elif prior:
        rows = "\n".join(
            f"| `{a['ref']}` | `{a['realigned_before']['original_adapter']}` | "
            f"{a['realigned_before']['total_energy_removed']:.4f} | {a['realigned_before']['rank']} "
            f"({a['realigned_before']['side']}) | `{a['realigned_before']['safety']}` |" for a in prior)
        others = len(report.adapters) - len(prior)
        realign = f"""These adapters are outputs of `salora-merge realign` (SaLoRA, Li et al., ICLR 2025): their
updates were projected off the base model's safety subspace before this merge (figures from each
folder's `salora_realign.json`).

| adapter | realigned from | share of update energy removed | r_s (side) | safety module |
|---|---|---|---|---|
{rows}
""" + (f"\n{others} other adapter(s) were merged as they are (not realigned).\n" if others else "")
    else:
        realign = ("The adapters were merged **as they are** (not realigned): fine-tuning can erode the base "
                   "model's refusals, and nothing here undoes that. `salora-merge merge --realign` projects the "
                   "updates off the safety subspace first.\n")
    if report.realign or prior:
        realign += "\n" + REALIGN_CAVEAT + "\n"
    audit_text = ""
    if audit:
        audit_text = "\n## Safety audit\n\n" + str(audit.get("markdown", "")).strip() + "\n"
    untied = ""
    if report.untied:
        untied = (f"\nThe base model ties its input and output embeddings; an adapter changed one of them, so the "
                  f"merge wrote `{report.untied[0]}` as a separate tensor and set `tie_word_embeddings: false`.\n")
    body = f"""
# {Path(report.output).name}

`{report.base_model}` with {len(report.adapters)} LoRA adapter(s) merged into its weights by
[salora-merge](https://pypi.org/project/salora-merge/) {__version__}. Load it with transformers like
any checkpoint; PEFT is not needed.

| adapter | weight | LoRA modules | modules_to_save |
|---|---|---|---|
{adapters}

Merge: `W' = W + sum_i weight_i * scaling_i * B_i A_i`, exactly (accumulated in float32 and cast once
to the stored dtype, {report.dtype}); {report.changed_tensors} tensors changed.
{untied}
## Safety

{realign}{audit_text}
## Provenance

`salora_config.yml` records the inputs (sha256 of every base shard and adapter file), the options and
the tool version; this command redoes the merge:

```
{redo_command(report)}
```
"""
    return hub_card(data, body)
