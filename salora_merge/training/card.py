"""The card of an adapter trained (or retrained) by salora-merge, with or without SaLoRA's constraint, exported as a
plain LoRA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.hf.cards import adapter_front_matter

if TYPE_CHECKING:
    from salora_merge.training.options import TrainReport

__all__ = ["trained_adapter_card", "TRAIN_CAVEAT"]

TRAIN_CAVEAT = (
    "Keeping the update out of the safety subspace is a constraint on the weights, not a measured guarantee "
    "of safe behaviour. In salora-merge's safety study (`docs/safety-study.md` in its source) on "
    "SmolLM2-135M-Instruct, training under "
    "the fixed `C` eroded refusals as much as plain LoRA on the same data (and, with `--init salora` at the "
    "same learning rate, much more). Measure refusals on held-out harmful prompts "
    "(`salora-merge audit --behavior`) before deployment."
)


ANCHORS_CAVEAT = (
    "In salora-merge's training study (`docs/train-study.md`: one task, one small aligned model, one seed) these "
    "anchors kept part of the refusals, not all (86% / 60% held-out AdvBench / HarmBench against the aligned "
    "model's 92% / 74%; plain LoRA 73% / 42%), and only on AdvBench-like phrasing. Audit the result with "
    "`salora-merge audit --behavior`."
)


NO_ANCHORS = ("- No refusal anchors (`--no-keep-refusals`): trained on the data alone, as plain LoRA. Fine-tuning "
              "on benign data alone erodes an aligned model's refusals.\n")


def _anchors_text(report: "TrainReport") -> str:
    if not report.refusal_anchors:
        return ""
    a = report.refusal_anchors
    return (f"- Refusal anchors mixed in (`--keep-refusals`): {a['examples_added']} examples added, {a['per_batch']} of "
            f"every batch of {a['batch_size']}, drawn from {a['distinct']} anchors (`{a['anchor_prompts']}` with the "
            f"base model's own responses, `{a['boundary_prompts']}` with its own answers); the first "
            f"{a['first_tokens']} response tokens of each weighted {a['first_weight']:g}. {ANCHORS_CAVEAT}\n")


def trained_adapter_card(report: "TrainReport", safety_meta: Mapping[str, Any], note: str | None = None) -> str:
    """Card of an adapter trained (or retrained) and exported as a plain LoRA; SaLoRA's text when it had a safety
    module."""
    base = report.base_model
    final = report.losses[-1][1] if report.losses else float("nan")
    first = report.losses[0][1] if report.losses else float("nan")
    if report.safety is None:
        return (
            adapter_front_matter(base, "lora", "safety")
            + f"""
# LoRA adapter trained with refusal anchors

Trained by [salora-merge](https://pypi.org/project/salora-merge/) on `{base}` as a plain LoRA (no safety module:
SaLoRA's constraint was off), stored as a stock PEFT LoRA of rank {report.export_rank}
(`lora_alpha = {report.export_alpha:g}`).

- Data: `{report.data}` ({report.examples} examples, {report.learned_tokens} learned tokens)
- Initialization: `{report.init}` (rank {report.rank}, alpha {report.alpha:g}{", rsLoRA" if report.use_rslora else ""});
  {report.modules} modules
- Steps: {report.global_step}; logged training loss {first:.4f} -> {final:.4f}
{_anchors_text(report) or NO_ANCHORS}{note or ""}
Measure refusals on held-out harmful prompts (`salora-merge audit --behavior`) before deployment. Full figures:
`salora_train.json`.
"""
        )
    return (
        adapter_front_matter(base, "lora", "salora", "safety")
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
{_anchors_text(report)}{note or ""}
{TRAIN_CAVEAT} Full figures: `salora_train.json`.
"""
    )
