"""Model cards (README.md with YAML front matter) for the folders salora-merge writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from salora_merge import __version__
from salora_merge.merging.provenance import redo_command

if TYPE_CHECKING:
    from salora_merge.merging.run import MergeReport
    from salora_merge.realignment.run import RealignReport
    from salora_merge.training.train import TrainReport

__all__ = ["adapter_card", "trained_adapter_card", "front_matter", "merged_card", "base_license",
           "REALIGN_CAVEAT", "TRAIN_CAVEAT"]

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
TRAIN_CAVEAT = (
    "Keeping the update out of the safety subspace is a constraint on the weights, not a measured guarantee "
    "of safe behaviour. In salora-merge's safety study (`docs/safety-study.md` in its source) on "
    "SmolLM2-135M-Instruct, training under "
    "the fixed `C` eroded refusals as much as plain LoRA on the same data (and, with `--init salora` at the "
    "same learning rate, much more). Measure refusals on held-out harmful prompts "
    "(`salora-merge audit --behavior`) before deployment."
)


def is_hub_id(ref: str) -> bool:
    """``org/name`` (what a card's base_model may hold), as opposed to a local path."""
    from salora_merge.hf.hub import is_repo_id

    return is_repo_id(ref) and not Path(ref).exists()


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
    hub_id = base if is_hub_id(base) else None  # a local folder is not a base_model the Hub accepts
    fields = {
        "base_model": hub_id,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ([f"base_model:adapter:{hub_id}"] if hub_id else []) + ["lora", "salora", "safety"],
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

The full per-module figures are in `salora_realign.json`.

{REALIGN_CAVEAT}
"""
    )


def trained_adapter_card(report: "TrainReport", safety_meta: Mapping[str, Any], note: str | None = None) -> str:
    """Card of an adapter trained (or retrained) with SaLoRA and exported as a plain LoRA."""
    base = report.base_model
    hub_id = base if is_hub_id(base) else None
    fields = {
        "base_model": hub_id,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ([f"base_model:adapter:{hub_id}"] if hub_id else []) + ["lora", "salora", "safety"],
    }
    final = report.losses[-1][1] if report.losses else float("nan")
    first = report.losses[0][1] if report.losses else float("nan")
    return (
        front_matter(fields)
        + f"""
# SaLoRA adapter

Trained by [salora-merge](https://pypi.org/project/salora-merge/) with SaLoRA (Li et al., ICLR 2025)
on `{base}`: each adapted layer computed `W_res x + s C (B (A x))` with the safety module
`C = I - U_s U_s^T` fixed, so no training step could move the layer's output inside the top-{report.safety_rank}
safety subspace. It is stored as a plain LoRA of rank {report.export_rank}
(`lora_A = [A ; A0]`, `lora_B = [C B , -C B0]`, `lora_alpha = {report.export_alpha:g}`, the same scaling as in
training) that stock PEFT loads on the untouched base.

- Data: `{report.data}` ({report.examples} examples, {report.learned_tokens} learned tokens)
- Initialization: `{report.init}` (rank {report.rank}, alpha {report.alpha:g}{", rsLoRA" if report.use_rslora else ""},
  task rank {report.task_rank}); {report.modules} modules
- Safety module: `{report.safety}` (prompts `{safety_meta.get('prompt_set')}`, token policy
  `{safety_meta.get('token_policy')}`, rank {report.safety_rank})
- Steps: {report.global_step}; logged training loss {first:.4f} -> {final:.4f}
- Share of the update's energy inside the safety subspace: {report.safety_energy:.2e}
{note or ""}
{TRAIN_CAVEAT} Full figures: `salora_train.json`.
"""
    )


def base_license(base) -> str | None:
    """The base model's licence: known for built-in aliases, else from its folder's card front matter."""
    if getattr(base, "license", None):
        return base.license
    card = base.folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # a base card we cannot parse must not stop a merge; the licence is then unknown
        return None
    return value if isinstance(value, str) else None


def merged_card(report: "MergeReport", base, audit: Mapping[str, Any] | None = None) -> str:
    """README.md of a merged model: Hub metadata (ModelCardData) and what was merged, how, with figures."""
    from huggingface_hub import ModelCard, ModelCardData

    license_ = base_license(base)
    prior = [a for a in report.adapters if a.get("realigned_before")]
    data = ModelCardData(
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
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
