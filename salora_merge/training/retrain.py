"""Retrain: re-learn what an existing adapter does, with refusal anchors (and SaLoRA's constraint with --safety).

With the adapter's own task data (``--data``), training uses it. Without it (``--prompts``), the
adapter is distilled: base + adapter answers the task prompts greedily and the new adapter learns those answers.
``--prompts discover`` finds those prompts from the adapter itself, as ``repair`` does (``training/discovery.py``:
user turns sampled from the adapted model and the built-in pool, the base model's refusals dropped, ranked by how
much the adapter changes the answer there); the most salient ``discover_top`` are distilled and held out.
A held-out part of the examples is never trained on; the report compares the old and the new adapter
there (NLL, target-token accuracy, agreement of their argmax, identical greedy answers when distilled)
and, given a safety module, in the weight-space safety score.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from salora_merge.core.audit_math import module_scores, summarize
from salora_merge.errors import InputError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.chat_templates import chat_prompt_ids
from salora_merge.hf.generation import greedy_responses
from salora_merge.hf.lora_hooks import lora_applied
from salora_merge.hf.resolve import resolve_adapter
from salora_merge.io.adapter import Adapter, check_adapter_fits, read_adapter
from salora_merge.io.prompts import load_prompt_set
from salora_merge.progress import Progress, silent
from salora_merge.training.data import (
    TokenizedExample,
    example_from_ids,
    examples_digest,
    load_conversations,
    split_holdout,
    tokenize_all,
)
from salora_merge.training.discovery import DISCOVER, DiscoveryOptions, discover_prompts
from salora_merge.training.prepare import load_for_training
from salora_merge.training.task_eval import (
    agreement,
    mean_nll,
    score_examples,
    target_accuracy,
)
from salora_merge.training.train import (
    RunControl,
    check_anchor_sets,
    TrainOptions,
    prepare_run,
    train_adapter,
    write_trained,
)
from salora_merge.version import __version__
from salora_merge.readable import Readable

__all__ = ["RetrainOptions", "RetrainReport", "run_retrain", "REPORT_NAME"]

REPORT_NAME = "salora_retrain.json"


@dataclass(frozen=True)
class RetrainOptions:
    data: Path | None = None
    prompts: str | None = None
    holdout: float = 0.1
    max_holdout: int = 64
    max_new_tokens: int = 128
    generation_batch_size: int = 32
    allow_pickle: bool = False
    discover_top: int = 80  # --prompts discover: the most salient prompts kept (repair's 64 distilled + 16 held out)
    discover_pool: str = "generic-tasks"  # ranked with the sampled turns ('none': sampled turns only)

    def validate(self) -> None:
        if (self.data is None) == (self.prompts is None):
            raise InputError("give exactly one of --data (the adapter's task data) or --prompts (task prompts to "
                             "distill the adapter's own answers from)")
        if not 0.0 < self.holdout < 1.0:
            raise InputError(f"--holdout must be between 0 and 1, got {self.holdout}")
        for name, value in (("--max-holdout", self.max_holdout), ("--max-new-tokens", self.max_new_tokens),
                            ("--generation-batch-size", self.generation_batch_size)):
            if value <= 0:
                raise InputError(f"{name} must be positive, got {value}")
        if self.prompts == DISCOVER and self.discover_top < 4:
            raise InputError(f"--discover-top must be at least 4 (some prompts are held out), got {self.discover_top}")


@dataclass(frozen=True)
class RetrainReport(Readable):
    adapter: str
    source: str  # "data" or "distilled"
    train_examples: int
    heldout_examples: int
    nll: dict  # base / original / retrained: mean NLL per held-out target token (nats)
    target_accuracy: dict  # share of held-out target tokens that are the model's argmax
    agreement: float  # share of held-out positions where original and retrained argmax agree
    exact_match: float | None  # distilled: share of held-out prompts answered identically (greedy)
    weight_space: dict | None  # rho of original and retrained update in the safety subspace, and the random
    # reference (None: no safety module given)
    train: dict
    discovery: dict | None = None  # --prompts discover: what was sampled, dropped and kept, with salience scores

    def to_json(self) -> dict:
        data = asdict(self)
        data["tool_version"] = __version__
        return data

    def render(self, output: str | None = None) -> str:
        """Comparison of the retrained adapter with the original (``RetrainReport``)."""
        exact = f"; identical greedy answers {self.exact_match:.3f}" if self.exact_match is not None else ""
        lines = [
            f"Retrained {self.adapter} ({self.source}: {self.train_examples} training, "
            f"{self.heldout_examples} held-out examples)",
            f"{'held-out':<22}{'base':>10}{'original':>10}{'retrained':>11}",
            f"{'NLL / target token':<22}{self.nll['base']:>10.4f}{self.nll['original']:>10.4f}"
            f"{self.nll['retrained']:>11.4f}",
            f"{'target accuracy':<22}{self.target_accuracy['base']:>10.4f}{self.target_accuracy['original']:>10.4f}"
            f"{self.target_accuracy['retrained']:>11.4f}",
            f"Argmax agreement original vs retrained: {self.agreement:.4f}{exact}",
            (f"Safety-subspace energy share: original {self.weight_space['original']:.4f}, retrained "
             f"{self.weight_space['retrained']:.2e} (random reference {self.weight_space['random_reference']:.4f})"
             if self.weight_space is not None else
             "No safety module given: no weight-space score (it says nothing about refusals on its own; measure "
             "them with salora-merge audit --behavior)"),
        ] + ([f"Wrote {output}"] if output else [])
        return "\n".join(lines)


def _distill(model, tokenizer, factors, prompt_ids: Sequence[list[int]], options: RetrainOptions,
             progress: Progress) -> list[list[int]]:
    """The adapter's greedy answers as token ids, with the end-of-turn token kept when it stopped on it."""
    with progress("generating the adapter's answers", len(prompt_ids)) as advance, lora_applied(model, factors):
        return greedy_responses(model, tokenizer, prompt_ids, options.max_new_tokens, options.generation_batch_size,
                                on_batch=advance)


def _distilled_examples(prompt_ids, answers, max_length: int) -> list[TokenizedExample]:
    out = [example_from_ids(p, a, max_length) for p, a in zip(prompt_ids, answers)]
    return [e for e in out if e is not None]


def run_retrain(
    base: "str | BaseModel",
    adapter_ref: str,
    safety_path: Path | None,
    options: RetrainOptions,
    train_options: TrainOptions,
    run: RunControl,
    progress: Progress = silent,
    echo: Callable[[str], None] | None = None,
) -> RetrainReport:
    """Retrain ``adapter_ref``'s behaviour (under SaLoRA's constraint when ``safety_path`` is given) and write the
    new adapter with a comparison report.

    ``train_options.targets``, ``rank``, ``alpha`` and ``use_rslora`` should already default to the old
    adapter's (the CLI does this through ``defaults_from_adapter``).
    """
    options.validate()
    train_options.validate()
    check_anchor_sets(train_options.keep_refusals)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("retrain generates and compares on one process; launch it without torchrun/accelerate "
                         "(train supports multi-process runs)")
    base, fingerprint, safety = prepare_run(base, safety_path, run, train_options)
    adapter: Adapter = read_adapter(resolve_adapter(adapter_ref), allow_pickle=options.allow_pickle)
    check_adapter_fits(adapter, base.module_weight_shapes)
    old_factors = {n: (m.lora_A, m.lora_B, m.scaling) for n, m in adapter.modules.items()}

    tokenizer = base.tokenizer
    pool = _discovery_pool(tokenizer, options) if options.prompts == DISCOVER else ()  # bad input: before the model
    model = load_for_training(base, train_options.device, train_options.placement())
    max_length = train_options.max_length
    heldout_prompt_ids: list[list[int]] | None = None
    teacher: list[list[int]] = []
    discovery = None
    if options.data is not None:
        conversations = load_conversations(Path(options.data))
        train_set, heldout_set = split_holdout(conversations, options.holdout, options.max_holdout)
        train_set_examples = tokenize_all(tokenizer, train_set, max_length, str(options.data))
        heldout = tokenize_all(tokenizer, heldout_set, max_length, f"{options.data} (held-out part)")
        source, label = "data", str(options.data)
    else:
        found = None
        if options.prompts == DISCOVER:
            found = discover_prompts(model, tokenizer, old_factors, DiscoveryOptions(seed=train_options.fit.seed),
                                     pool=pool, progress=progress)
            prompts = [c.prompt for c in found.ranked[: options.discover_top]]
            if len(prompts) < 4:
                raise InputError(f"--prompts discover kept {len(prompts)} prompts (the base model refused the "
                                 "rest); give the adapter's task prompts with --prompts FILE")
        else:
            prompts = list(load_prompt_set(str(options.prompts)).prompts)
        prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        train_ids, heldout_prompt_ids = split_holdout(prompt_ids, options.holdout, options.max_holdout)
        answers = _distill(model, tokenizer, old_factors, train_ids + heldout_prompt_ids, options, progress)
        teacher = answers[len(train_ids):]
        train_set_examples = _distilled_examples(train_ids, answers[: len(train_ids)], max_length)
        heldout = _distilled_examples(heldout_prompt_ids, teacher, max_length)
        if not train_set_examples or not heldout:
            raise InputError(f"--prompts {options.prompts}: no answer of the adapter fits --max-length {max_length}; "
                             "raise --max-length")
        source, label = "distilled", f"{options.prompts} (greedy answers of {adapter_ref})"
        if found is not None:
            discovery = {**found.summary(), "kept": [c.as_row() for c in found.ranked[: options.discover_top]]}
    pad = tokenizer.pad_token_id
    scores_base = score_examples(model, heldout, pad)
    with lora_applied(model, old_factors):
        scores_old = score_examples(model, heldout, pad)

    # Training rewrites the target weights of the model it is given (W_res), so the new adapter is scored
    # on a fresh load of the base: exactly as a user would load the exported adapter.
    trained = train_adapter(base, fingerprint, safety, safety_path, train_set_examples, label,
                            examples_digest(train_set_examples), train_options, run, progress, echo,
                            model=model, tokenizer=tokenizer)
    del model
    model = load_for_training(base, train_options.device, train_options.placement())
    new_factors = {n: (m.lora_A, m.lora_B, m.scaling) for n, m in trained.modules.items()}
    with lora_applied(model, new_factors):
        scores_new = score_examples(model, heldout, pad)
    exact = None
    if heldout_prompt_ids is not None:
        answers_new = _distill(model, tokenizer, new_factors, heldout_prompt_ids, options, progress)
        exact = sum(a == b for a, b in zip(teacher, answers_new)) / len(teacher)
    weight_space, energy = None, ""
    if safety is not None:
        old_score = summarize(module_scores(old_factors, {n: safety.bases[n] for n in old_factors
                                                          if n in safety.bases}))
        new_score = summarize(module_scores(new_factors, {n: safety.bases[n] for n in new_factors}))
        weight_space = {"original": old_score.rho, "retrained": new_score.rho,
                        "random_reference": new_score.random_reference}
        energy = f" Safety-subspace energy share {old_score.rho:.2e} -> {new_score.rho:.2e}."
    report = RetrainReport(
        adapter=str(adapter_ref), source=source, train_examples=len(train_set_examples),
        heldout_examples=len(heldout),
        nll={"base": mean_nll(scores_base), "original": mean_nll(scores_old), "retrained": mean_nll(scores_new)},
        target_accuracy={"base": target_accuracy(scores_base), "original": target_accuracy(scores_old),
                         "retrained": target_accuracy(scores_new)},
        agreement=agreement(scores_old, scores_new), exact_match=exact,
        weight_space=weight_space, train=trained.report.to_json(), discovery=discovery,
    )
    note = (f"\nRetrained from `{adapter_ref}` ({source}). On {len(heldout)} held-out examples: NLL per target "
            f"token {report.nll['original']:.3f} (original) vs {report.nll['retrained']:.3f} (retrained), "
            f"base {report.nll['base']:.3f}; argmax agreement {report.agreement:.3f}.{energy} Figures: "
            f"`{REPORT_NAME}`.\n")
    write_trained(trained, run, base, extra={REPORT_NAME: json.dumps(report.to_json(), indent=2) + "\n"},
                  card_note=note, progress=progress)
    return report


def _discovery_pool(tokenizer, options: RetrainOptions) -> tuple[str, ...]:
    """--prompts discover's inputs checked (a chat template to sample user turns from, the pool) and the pool."""
    from salora_merge.hf.chat_templates import user_turn_frame

    user_turn_frame(tokenizer)  # no chat template: one line
    return () if options.discover_pool == "none" else tuple(load_prompt_set(options.discover_pool).prompts)


def defaults_from_adapter(adapter_ref: str, options: TrainOptions, given: dict, allow_pickle: bool) -> TrainOptions:
    """Fill rank, alpha, rsLoRA and targets the user did not give from the old adapter's config."""
    adapter = read_adapter(resolve_adapter(adapter_ref), allow_pickle=allow_pickle)
    ranks = {m.rank for m in adapter.modules.values()}
    return replace(
        options,
        rank=given["rank"] if given.get("rank") is not None else max(ranks),
        alpha=given["alpha"] if given.get("alpha") is not None else float(adapter.spec.lora_alpha),
        use_rslora=given["use_rslora"] if given.get("use_rslora") is not None else adapter.spec.use_rslora,
        targets=given["targets"] if given.get("targets") else tuple(sorted(adapter.modules)),
    )
