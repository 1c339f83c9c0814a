"""SaLoRA training: task-specific initialization, training under the fixed safety module, portable export.

Order (method.md sections 2-4): every statistic is collected from the unmodified model first; then each
target weight is replaced in place by ``W_res = W - s C B0 A0`` and the layer computes
``W_res x + s C (B (A x))`` while ``A``, ``B`` train with ``C`` fixed; the result is written as a plain PEFT
LoRA of rank ``2r`` that stock PEFT loads on the untouched base.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from salora_merge.core.audit_math import module_scores, summarize
from salora_merge.core.refit_loss import IGNORE, token_weights
from salora_merge.core.safety import (
    SafetyModule,
    check_same_base,
    random_control,
)
from salora_merge.errors import InputError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.loading import input_device
from salora_merge.hf.resolve import resolve_model
from salora_merge.io.adapter import LoraModule, write_adapter
from salora_merge.io.atomic import atomic_output_dir
from salora_merge.io.safety_file import load_safety_module
from salora_merge.progress import Progress, silent
from salora_merge.training.anchors import anchor_examples
from salora_merge.training.card import trained_adapter_card
from salora_merge.training.data import TokenizedExample, tokenize_all
from salora_merge.training.mixture import anchors_per_batch, mixed_order, mixture_steps
from salora_merge.training.objective import WeightedItem, weighted_collate, weighted_loss
from salora_merge.training.options import KeepRefusals, TrainOptions, TrainReport
from salora_merge.training.prepare import (
    PreparedModel,
    _target_modules,
    adapter_config,
    export_modules,
    load_for_training,
    prepare_model,
)
from salora_merge.training.runs import (
    RUN_NAME,
    RunControl,
    _resume_point,
    _run_key,
    _start_checkpoints,
    is_main_process,
)
from salora_merge.training.trainer import (
    FitOptions,
    FitResult,
    fit,
    last_checkpoint,
    read_state,
)

__all__ = ["TrainOptions", "TrainReport", "PreparedModel", "TrainedAdapter", "prepare_model", "export_modules",
           "adapter_config", "prepare_run", "train_adapter", "write_trained", "run_train",
           "RunControl", "is_main_process", "REPORT_NAME", "RUN_NAME", "anchored_mixture", "check_anchor_sets"]

REPORT_NAME = "salora_train.json"


@dataclass(frozen=True)
class Mixture:
    """The anchored training set: the items in training order, the trainer's steps, and the report's record."""

    items: list[WeightedItem]
    fit: FitOptions
    record: dict


def _prompt_list(spec: str, limit: int, option: str) -> tuple[str, list[str]]:
    from salora_merge.io.prompts import load_prompt_set

    try:
        prompts = load_prompt_set(spec).head(limit)
    except InputError as exc:
        raise InputError(f"{option}: {exc}") from None
    if not prompts.prompts:
        raise InputError(f"{option} {spec}: no prompts; give a file with one prompt per line (or JSONL with a "
                         "'prompt' field), or a built-in set")
    return prompts.name, list(prompts.prompts)


def check_anchor_sets(keep: KeepRefusals) -> None:
    """The anchor and boundary prompt sets load and are not empty (before any model is loaded)."""
    if keep.enabled:
        _prompt_list(keep.anchor_prompts, keep.max_anchors, "--anchor-prompts")
        if keep.boundary_prompts != "none":
            _prompt_list(keep.boundary_prompts, keep.max_boundary, "--boundary-prompts")


def anchored_mixture(base: BaseModel, model: torch.nn.Module, examples: Sequence[TokenizedExample],
                     options: TrainOptions, progress: Progress = silent) -> Mixture:
    """The user's ``examples`` (every learned token weight 1) with the anchors (``training/anchors.py``, the base
    model's own responses, cached per base model) in ``keep_refusals.share`` of every batch, in training order,
    and the trainer's options that read it so. ``model``: the base as loaded, unmodified."""
    keep, fit_options = options.keep_refusals, options.fit
    anchor_name, anchor_prompts = _prompt_list(keep.anchor_prompts, keep.max_anchors, "--anchor-prompts")
    boundary_name, boundary_prompts = ("none", []) if keep.boundary_prompts == "none" else _prompt_list(
        keep.boundary_prompts, keep.max_boundary, "--boundary-prompts")
    anchors = anchor_examples(base, model, anchor_prompts, boundary_prompts, keep.answer_tokens, options.max_length,
                              fit_options.batch_size, progress, response_tokens=keep.train_tokens)
    if not anchors:
        raise InputError(f"--anchor-prompts {keep.anchor_prompts}: no anchor keeps a response token within "
                         f"--max-length {options.max_length}; raise it")
    k = anchors_per_batch(keep.share, fit_options.batch_size)
    steps, passes = mixture_steps(len(examples), k, fit_options.batch_size, fit_options.grad_accum,
                                  fit_options.epochs, fit_options.max_steps)
    order = mixed_order(len(examples), len(anchors), k, fit_options.batch_size, passes, fit_options.seed)
    task = [WeightedItem(e, [0.0 if label == IGNORE else 1.0 for label in e.labels]) for e in examples]
    anchored = [WeightedItem(e, token_weights(e.labels, keep.first_tokens, keep.first_weight)) for e in anchors]
    items = [anchored[i] if is_anchor else task[i] for is_anchor, i in order]
    record = {"anchor_prompts": anchor_name, "boundary_prompts": boundary_name, "distinct": len(anchors),
              "per_batch": k, "batch_size": fit_options.batch_size, "share": k / fit_options.batch_size,
              "examples_added": sum(1 for is_anchor, _ in order if is_anchor), "first_tokens": keep.first_tokens,
              "first_weight": keep.first_weight, "response_tokens": keep.train_tokens or keep.answer_tokens,
              "steps": steps, "passes": passes}
    return Mixture(items=items, fit=replace(fit_options, max_steps=steps, sequential=True), record=record)


@dataclass
class TrainedAdapter:
    """A trained SaLoRA adapter exported in memory, before it is written."""

    modules: dict[str, LoraModule]
    config: dict
    report: TrainReport
    safety_meta: dict


def prepare_run(base: "str | BaseModel", safety_path: Path | None, run: RunControl,
                options: TrainOptions) -> tuple[BaseModel, str, SafetyModule | None]:
    """Resolve the base and load the safety module (checked against it) before any work; no module: None."""
    if options.random_control is not None and safety_path is None:
        raise InputError("--random-control draws random subspaces of a safety module's sizes: give --safety")
    run.check_outputs_free()
    base = resolve_model(base)
    fingerprint = base.fingerprint
    if safety_path is None:
        return base, fingerprint, None
    safety = load_safety_module(Path(safety_path))
    check_same_base(safety, fingerprint, base.model_id, str(safety_path))
    return base, fingerprint, safety


def train_adapter(
    base: BaseModel,
    fingerprint: str,
    safety: SafetyModule | None,
    safety_path: Path | None,
    examples: Sequence[TokenizedExample],
    data_label: str,
    data_digest: str,
    options: TrainOptions,
    run: RunControl,
    progress: Progress = silent,
    echo: Callable[[str], None] | None = None,
    callbacks: Sequence[object] = (),
    model: torch.nn.Module | None = None,
    tokenizer=None,
) -> TrainedAdapter:
    """Initialize, train on tokenized ``examples`` (resuming from a checkpoint when asked) and export, in memory.

    ``model``/``tokenizer``: the unmodified base already loaded, to spare a load (its weights are rewritten).
    ``safety=None``: plain LoRA (with the anchors, when asked), no constraint.
    """
    checkpoint_dir = run.checkpoints
    if options.random_control is not None:  # prepare_run checked that a module was given
        safety = random_control(safety, options.random_control)
    key = _run_key(fingerprint, Path(safety_path) if safety_path is not None else None, data_digest, options)
    resume_from = _resume_point(checkpoint_dir, key, run.resume, run.overwrite)
    resume_state = read_state(resume_from) if resume_from is not None else None

    mixture = None
    if options.keep_refusals.enabled:  # the anchors' responses come from the unmodified base: before prepare_model
        model = model if model is not None else load_for_training(base, options.device, options.placement())
        mixture = anchored_mixture(base, model, examples, options, progress)
    prepared = prepare_model(base, safety, examples, options, resume_state, progress, str(safety_path),
                             model=model, tokenizer=tokenizer)
    device = input_device(prepared.model)  # under --device-map, where the batches go (the first layer's GPU)
    fit_options = replace(mixture.fit if mixture else options.fit, device=device.type)
    pad = prepared.tokenizer.pad_token_id
    extra = ({"collate": weighted_collate(pad, 1), "loss": weighted_loss()} if mixture else {})
    if resume_from is None:
        _start_checkpoints(checkpoint_dir, key)
    try:
        result: FitResult = fit(prepared.model, mixture.items if mixture else examples, pad, fit_options,
                                checkpoint_dir, resume_from=resume_from, callbacks=callbacks, echo=echo, **extra)
    except BaseException:
        if last_checkpoint(checkpoint_dir) is None:  # nothing to resume from: leave nothing behind
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        raise

    modules = export_modules(prepared.layers)
    doubled = any(layer.has_initial_part for layer in prepared.layers.values())
    config = adapter_config(options, base.model_id,
                            _target_modules(list(prepared.layers), prepared.linear_names), doubled,
                            prepared.fan_in_fan_out)
    scores = (module_scores({n: (m.lora_A, m.lora_B, m.scaling) for n, m in modules.items()},
                            {n: safety.bases[n] for n in modules}) if safety is not None else None)
    report = TrainReport(
        base_model=base.model_id, data=data_label, data_sha256=data_digest, examples=len(examples),
        learned_tokens=sum(sum(e.response_mask) for e in examples),
        safety=str(safety_path) if safety is not None else None, safety_rank=safety.rank if safety is not None else 0,
        init=options.init, rank=options.rank, alpha=options.alpha,
        use_rslora=options.use_rslora, task_rank=options.task_rank, task_tokens=prepared.task_tokens,
        export_rank=int(config["r"]), export_alpha=float(config["lora_alpha"]), modules=len(modules),
        global_step=result.global_step, train_loss=result.train_loss, losses=result.losses,
        safety_energy=summarize(scores).rho if scores is not None else None, seconds_init=prepared.seconds_init, seconds_train=result.seconds,
        resumed_from=str(resume_from) if resume_from else None, output=str(run.out),
        merged=str(run.merge_to) if run.merge_to else None, options=options.run_key(),
        refusal_anchors=mixture.record if mixture else None,
    )
    return TrainedAdapter(modules=modules, config=config, report=report,
                          safety_meta=dict(safety.metadata) if safety is not None else {})


def write_trained(trained: TrainedAdapter, run: RunControl, base: "str | BaseModel", extra: Mapping[str, str] | None = None,
                  card_note: str | None = None, progress: Progress = silent) -> None:
    """Write the adapter folder atomically (PEFT files, the report, the card and any ``extra`` text files);
    then merge it when asked, and drop the checkpoints unless kept."""
    with atomic_output_dir(Path(run.out), overwrite=run.overwrite) as tmp:
        write_adapter(tmp, trained.config, trained.modules, {})
        (tmp / REPORT_NAME).write_text(json.dumps(trained.report.to_json(), indent=2) + "\n")
        (tmp / "README.md").write_text(trained_adapter_card(trained.report, trained.safety_meta, card_note))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    if run.merge_to is not None:
        from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge

        run_merge(base, [AdapterInput(str(run.out), 1.0)], Path(run.merge_to), MergeOptions(),
                  overwrite=run.overwrite, progress=progress)
    if not run.keep_checkpoints:
        shutil.rmtree(run.checkpoints, ignore_errors=True)


def run_train(
    base: "str | BaseModel",
    conversations,
    data_label: str,
    data_digest: str,
    safety_path: Path | None,
    options: TrainOptions,
    run: RunControl,
    progress: Progress = silent,
    echo: Callable[[str], None] | None = None,
    callbacks: Sequence[object] = (),
) -> TrainReport:
    """Train an adapter on ``conversations`` (under SaLoRA's constraint when ``safety_path`` is given) and write
    the portable PEFT adapter to ``run.out``."""
    options.validate()
    check_anchor_sets(options.keep_refusals)
    base, fingerprint, safety = prepare_run(base, safety_path, run, options)
    tokenizer = base.tokenizer
    examples = tokenize_all(tokenizer, conversations, options.max_length, data_label)
    trained = train_adapter(base, fingerprint, safety, safety_path, examples, data_label, data_digest, options, run,
                            progress, echo, callbacks, tokenizer=tokenizer)
    if is_main_process():
        write_trained(trained, run, base, progress=progress)
    return trained.report
