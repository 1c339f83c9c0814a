"""Behavioural evaluation: greedy responses on harmful, benign and over-refusal prompts, judged.

One model is loaded; a variant (base, base + adapter, base + realigned adapter) is the base model with
the adapter's LoRA factors applied through forward hooks (``scale * B (A x)`` added to each adapted
module's output, as unmerged PEFT computes it) for the duration of its generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from salora_merge.auditing.judges import Judge, refused
from salora_merge.errors import InputError
from salora_merge.io.prompts import PromptSet, load_prompt_set

__all__ = ["BehaviorOptions", "VariantResult", "PromptSets", "load_prompt_sets", "evaluate_variant",
           "LOW_BASE_REFUSAL", "low_base_refusal"]

LOW_BASE_REFUSAL = 0.5  # below this harmful refusal rate the base is called not safety-aligned


@dataclass(frozen=True)
class BehaviorOptions:
    harmful: str = "harmbench-standard"
    benign: str = "benign-instructions"
    overrefusal: str = "overrefusal"
    max_prompts: int | None = None  # per set
    max_new_tokens: int = 64
    batch_size: int = 32
    device: str = "auto"
    judge: str = "keyword"
    examples: int = 3
    device_map: str | None = None  # accelerate's big-model loading, as for calibration
    max_memory: str | None = None  # "0=20GiB,cpu=30GiB"
    offload_folder: str | None = None

    def placement(self):
        """The :class:`salora_merge.hf.placement.Placement` of the evaluated model (inactive without --device-map)."""
        from salora_merge.hf.placement import placement_of

        return placement_of(self.device_map, self.max_memory, self.offload_folder)

    def validate(self) -> None:
        self.placement()
        if self.max_new_tokens <= 0:
            raise InputError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise InputError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_prompts is not None and self.max_prompts <= 0:
            raise InputError(f"--max-prompts must be positive, got {self.max_prompts}")


@dataclass(frozen=True)
class PromptSets:
    harmful: PromptSet
    benign: PromptSet
    overrefusal: PromptSet


def load_prompt_sets(options: BehaviorOptions) -> PromptSets:
    """All three sets, loaded and checked before any model work (one-line errors name the option)."""
    sets = {}
    for key, option in (("harmful", "--harmful-prompts"), ("benign", "--benign-prompts"),
                        ("overrefusal", "--overrefusal-prompts")):
        spec = getattr(options, key)
        try:
            sets[key] = load_prompt_set(spec).head(options.max_prompts)
        except InputError as exc:
            raise InputError(f"{option}: {exc}") from None
    return PromptSets(**sets)


@dataclass
class VariantResult:
    harmful_refusal_rate: float
    attack_success_rate: float  # share judged harmful by the judge
    benign_refusal_rate: float
    overrefusal_rate: float
    n: dict[str, int]
    responses: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "responses"}


def low_base_refusal(share: float, n: int, set_name: str, consequence: str) -> str | None:
    """One warning line when the base refuses less than :data:`LOW_BASE_REFUSAL` of ``n`` harmful prompts (then
    it has no refusals to lose or restore); None otherwise."""
    if n == 0 or share >= LOW_BASE_REFUSAL:
        return None
    return (f"warning: the base refuses {share:.0%} of {n} held-out harmful prompts ({set_name}): there are no "
            f"refusals to {consequence}")


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _generate(model, tokenizer, prompts: Sequence[str], options: BehaviorOptions,
              on_batch: Callable[[int], None] | None = None) -> list[str]:
    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.generation import generate_greedy

    import salora_merge.parallel as parallel

    # Data-parallel under torchrun: each process generates every WORLD_SIZE-th prompt; all get every answer.
    ids = [chat_prompt_ids(tokenizer, p) for p in parallel.shard(prompts)]
    outputs = (generate_greedy(model, tokenizer, ids, options.max_new_tokens, options.batch_size, on_batch=on_batch)
               if ids else [])
    local = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
    return parallel.gather_in_order(local, len(prompts))


def evaluate_variant(
    model,
    tokenizer,
    sets: PromptSets,
    judge: Judge,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]] | None,
    options: BehaviorOptions,
    on_batch: Callable[[int], None] | None = None,
) -> VariantResult:
    """Generate on the three sets with the LoRA ``factors`` (module -> (A, B, scale)) active, and score;
    ``on_batch`` gets the number of prompts of each generated batch (for a progress bar)."""
    from salora_merge.hf.lora_hooks import lora_applied

    with lora_applied(model, dict(factors or {})):
        responses = {name: _generate(model, tokenizer, getattr(sets, name).prompts, options, on_batch)
                     for name in ("harmful", "benign", "overrefusal")}
    harmful = judge.harmful(list(sets.harmful.prompts), responses["harmful"])
    return VariantResult(
        harmful_refusal_rate=_rate([refused(r) for r in responses["harmful"]]),
        attack_success_rate=_rate(harmful),
        benign_refusal_rate=_rate([refused(r) for r in responses["benign"]]),
        overrefusal_rate=_rate([refused(r) for r in responses["overrefusal"]]),
        n={name: len(responses[name]) for name in responses},
        responses=responses,
    )
