"""Repair: apply a repair method to an eroded adapter, then measure what it did on held-out prompts.

The method runs through the realign runner (``realignment.run.apply_method``); repair adds the task prompts
(the user's, or the built-in ``generic-tasks``; some held out of the method for the agreement check), the
audit's behavioural evaluation of the base, the adapter and the repaired adapter, and the report and card.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from salora_merge.auditing.behavior import (
    BehaviorOptions,
    PromptSets,
    evaluate_variant,
    load_prompt_sets,
    low_base_refusal,
)
from salora_merge.auditing.judges import load_judge
from salora_merge.calibration.run import CalibrationOptions
from salora_merge.core.agreement import agreement, exact_answers, gain_kept
from salora_merge.errors import InputError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.resolve import resolve_model
from salora_merge.io.prompts import PromptSet, load_prompt_set
from salora_merge.methods import get_method
from salora_merge.progress import Progress, silent
from salora_merge.realignment.run import Applied, Sources, apply_method, write_applied
from salora_merge.repairing.report import REPORT_NAME, RepairReport

__all__ = ["RepairOptions", "run_repair", "DEFAULT_METHOD", "split_task_prompts", "load_task_check"]

DEFAULT_METHOD = "refit"
DISCOVER = "discover"  # the default task prompts: found from the adapter by a method that can (refit)
TASK_FALLBACK = "generic-tasks"  # the agreement check's prompts for a method that does not discover


@dataclass(frozen=True)
class RepairOptions:
    method: str = DEFAULT_METHOD
    task_prompts: str = DISCOVER
    heldout: int = 16  # task prompts held out of the method for the agreement check (at most a quarter)
    evaluate: bool = True
    behavior: BehaviorOptions = field(default_factory=lambda: BehaviorOptions(max_prompts=50, max_new_tokens=32))
    seed: int = 0
    task_check: str | None = None  # prompts with expected answers: exact-answer accuracy before and after
    chat_template: str | None = None  # --chat-template for every prompt of the repair (None: the model's own)

    def validate(self) -> None:
        get_method(self.method)
        if self.heldout < 0:
            raise InputError(f"--heldout-task-prompts must be 0 or more, got {self.heldout}")
        if self.task_check is not None and not self.evaluate:
            raise InputError("--task-check is measured by the evaluation: drop --no-eval or drop --task-check")
        self.behavior.validate()


def split_task_prompts(prompts: PromptSet, heldout: int, seed: int) -> tuple[PromptSet, PromptSet]:
    """(for the method, held out): a seeded shuffle, then the last ``min(heldout, n // 4)`` prompts held out."""
    order = list(range(len(prompts.prompts)))
    random.Random(seed).shuffle(order)
    k = min(heldout, len(order) // 4)
    keep, held = sorted(order[: len(order) - k]), sorted(order[len(order) - k:])
    pick = lambda idx, tag: PromptSet(f"{prompts.name}{tag}", tuple(prompts.prompts[i] for i in idx))  # noqa: E731
    return pick(keep, ""), pick(held, " (held out)")


def _load_task_prompts(spec: str) -> PromptSet:
    try:
        task = load_prompt_set(spec)
    except InputError as exc:
        raise InputError(f"--task-prompts: {exc}") from None
    if not task.prompts:
        raise InputError(f"--task-prompts {spec}: no prompts; give a file with one prompt per line (or JSONL with "
                         "a 'prompt' field), or leave it out for the built-in generic-tasks")
    return task


def load_task_check(spec: str) -> PromptSet:
    """``--task-check``: prompts with the answers the task expects (JSONL with 'prompt' and 'answer', or CSV)."""
    try:
        check = load_prompt_set(spec)
    except InputError as exc:
        raise InputError(f"--task-check: {exc}") from None
    if check.responses is None:
        raise InputError(f"--task-check {spec}: no expected answers; give JSONL lines "
                         '{"prompt": ..., "answer": ...} (or a CSV with prompt and answer columns)')
    return check


def _measure(applied: Applied, held: PromptSet, sets: PromptSets, options: RepairOptions,
             progress: Progress, check: PromptSet | None = None) -> dict[str, Any]:
    """The behaviour of the base, the adapter and the repaired adapter on the held-out evaluation sets, and the
    repaired adapter's (and the base's) agreement with the adapter on the held-out task prompts."""
    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.generation import generate_greedy
    from salora_merge.hf.lora_hooks import lora_applied
    from salora_merge.hf.loading import pick_device

    behavior = options.behavior
    base = applied.base
    model, tokenizer = base.load_model(pick_device(behavior.device), behavior.placement()), base.tokenizer
    judge = load_judge(behavior.judge)
    variants = {"base": {}, "adapter": dict(applied.adapter.modules), "repaired": dict(applied.modules)}
    out: dict[str, Any] = {"behavior": {}, "task": {}, "task_check": {}}
    answers, checked = {}, {}
    task_ids = [chat_prompt_ids(tokenizer, p) for p in held.prompts]
    check_ids = [chat_prompt_ids(tokenizer, p) for p in check.prompts] if check else []
    check_tokens = (max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in check.responses) + 4
                    if check else 0)
    per_variant = sum(len(getattr(sets, k).prompts) for k in ("harmful", "benign", "overrefusal"))
    per_variant += len(task_ids) + len(check_ids)
    with progress("evaluating base, adapter and repaired adapter (prompts)", len(variants) * per_variant) as advance:
        for name, modules in variants.items():
            factors = {n: (m.lora_A, m.lora_B, m.scaling) for n, m in modules.items()}
            result = evaluate_variant(model, tokenizer, sets, judge, factors, behavior, on_batch=advance)
            out["behavior"][name] = result.to_json()
            with lora_applied(model, factors):
                if task_ids:
                    answers[name] = generate_greedy(model, tokenizer, task_ids, behavior.max_new_tokens,
                                                    behavior.batch_size, on_batch=advance)
                if check_ids:
                    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in generate_greedy(
                        model, tokenizer, check_ids, check_tokens, behavior.batch_size, on_batch=advance)]
                    checked[name] = sum(exact_answers(texts, check.responses)) / len(texts)
    if task_ids:
        out["task"] = {"prompts": len(task_ids), "max_new_tokens": behavior.max_new_tokens,
                       "repaired_vs_adapter": agreement(answers["adapter"], answers["repaired"]),
                       "base_vs_adapter": agreement(answers["adapter"], answers["base"])}
    if check_ids:
        out["task_check"] = {"name": check.name, "prompts": len(check_ids), "max_new_tokens": check_tokens,
                             **checked, "kept": gain_kept(checked["base"], checked["adapter"], checked["repaired"])}
    out["sets"] = {"harmful": sets.harmful.name, "benign": sets.benign.name, "overrefusal": sets.overrefusal.name,
                   "judge": behavior.judge, "max_new_tokens": behavior.max_new_tokens}
    return out


PROBE_PROMPTS = 16  # held-out harmful prompts the base answers before the repair, for the warning below


def base_refusal_warning(base: BaseModel, sets: PromptSets, behavior: BehaviorOptions,
                         trains: bool = False) -> str | None:
    """One line when the base model refuses fewer than half of the first :data:`PROBE_PROMPTS` held-out harmful
    prompts (greedy, the keyword judge): then there are no refusals to restore. None otherwise. With ``trains``
    (the method trains on the model as placed), a placement training cannot run on is refused first."""
    from salora_merge.auditing.judges import refused
    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.generation import generate_greedy
    from salora_merge.hf.loading import pick_device

    prompts = sets.harmful.prompts[:PROBE_PROMPTS]
    if not prompts:
        return None
    model, tokenizer = base.load_model(pick_device(behavior.device), behavior.placement()), base.tokenizer
    if trains:
        from salora_merge.hf.placement import check_trainable
        check_trainable(getattr(model, "hf_device_map", None))  # its one-line error before any warning
    answers = generate_greedy(model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in prompts],
                              min(16, behavior.max_new_tokens), behavior.batch_size)
    share = sum(refused(tokenizer.decode(a, skip_special_tokens=True)) for a in answers) / len(prompts)
    return low_base_refusal(share, len(prompts), sets.harmful.name,
                            "restore; repair needs a safety-aligned base (built in: smollm2-135m-aligned)")


def run_repair(
    base: "str | BaseModel",
    adapter_ref: str,
    out: Path,
    options: RepairOptions = RepairOptions(),
    method_options: Mapping[str, Any] | None = None,
    safety_path: Path | None = None,
    calibration: CalibrationOptions | None = None,
    aligned: "str | BaseModel | None" = None,
    unaligned: "str | BaseModel | None" = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress = silent,
    warn: Callable[[str], None] | None = None,
) -> RepairReport:
    """Repair ``adapter_ref`` for ``base`` with ``options.method`` and write a stock PEFT adapter folder, the
    method's report, ``salora_repair.json`` and a card at ``out``; nothing is written on error. ``warn`` gets
    one line each for what the user should know before the long work (a base that refuses too little to have
    refusals to restore) and after it (fewer held-out task prompts than asked)."""
    options.validate()
    method = get_method(options.method)
    given = dict(method_options or {})
    if given.get("task_prompts") is not None:
        raise InputError("give the task prompts as repair's --task-prompts (some are held out for the agreement "
                         "check), not as a method option")
    takes_prompts = any(o.name == "task_prompts" for o in method.options)
    discovering = options.task_prompts == DISCOVER and takes_prompts
    if discovering:  # the method finds them; its report names the ones it held out
        task, for_method, held = PromptSet(DISCOVER, ()), None, None
    else:
        task = _load_task_prompts(TASK_FALLBACK if options.task_prompts == DISCOVER else options.task_prompts)
        for_method, held = split_task_prompts(task, options.heldout, options.seed)
    if takes_prompts:
        given["task_prompts"] = DISCOVER if discovering else options.task_prompts
    sets = load_prompt_sets(options.behavior) if options.evaluate else None  # a bad set fails before model work
    check = load_task_check(options.task_check) if options.task_check is not None else None
    sources = Sources(safety=safety_path, calibration=calibration, aligned=aligned, unaligned=unaligned,
                      task_prompts=for_method, heldout=options.heldout if discovering else 0,
                      device=options.behavior.device, placement=options.behavior.placement())
    base = resolve_model(base)
    template = options.chat_template or (calibration.chat_template if calibration is not None else None)
    if template is not None:
        base.use_chat_template(template)  # anchors, discovery, distillation and evaluation: one template

    def checked(base: BaseModel) -> None:  # every input checked: warn now, before the long work
        if discovering:
            from salora_merge.hf.chat_templates import user_turn_frame
            user_turn_frame(base.tokenizer)  # no chat template to sample from: one line, before the probe
        low = (base_refusal_warning(base, sets, options.behavior, trains=method.name == "refit")
               if options.evaluate and warn else None)
        if low:
            warn(low)

    started = time.perf_counter()
    applied = apply_method(base, adapter_ref, Path(out), method.name, given, sources, overwrite, allow_pickle, progress,
                           checked=checked)
    seconds_method = time.perf_counter() - started
    if discovering:
        found = applied.report.to_json().get("discovery") or {}
        held = PromptSet("discovered (held out)", tuple(r["prompt"] for r in found.get("heldout", ())))
        for_method = PromptSet(DISCOVER, tuple(r["prompt"] for r in found.get("distilled", ())))
    if warn is not None and len(held.prompts) < options.heldout:
        warn(f"warning: {len(held.prompts)} task prompts held out for the agreement check, not the "
             f"{options.heldout} asked (--heldout-task-prompts: at most a quarter of the task prompts)")
    measured: dict[str, Any] = {}
    seconds_eval = 0.0
    if options.evaluate:
        started = time.perf_counter()
        measured = _measure(applied, held, sets, options, progress, check)
        seconds_eval = time.perf_counter() - started
    ranks = sorted({m.rank for m in applied.modules.values()})
    report = RepairReport(
        base_model=base.model_id, adapter=str(adapter_ref), method=method.name,
        method_options={k: v for k, v in given.items() if k != "task_prompts"},
        task_prompts=task.name, task_prompts_used=len(for_method.prompts), task_prompts_heldout=len(held.prompts),
        ranks=ranks, behavior=measured.get("behavior", {}), task=measured.get("task", {}),
        task_check=measured.get("task_check", {}),
        eval_sets=measured.get("sets", {}), seconds_method=seconds_method, seconds_eval=seconds_eval,
        output=str(out), method_report=applied.report.to_json())
    write_applied(applied, Path(out), overwrite, extra={REPORT_NAME: json.dumps(report.to_json(), indent=2) + "\n"},
                  card=report.card(applied.config))
    return report

