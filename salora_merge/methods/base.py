"""What a realign or repair method is: its name, its options, what it needs, and one function.

A method turns an adapter's LoRA modules (plus what it declared it needs) into new modules and a
report. :mod:`salora_merge.realignment.run` gathers what the method needs (a safety module, an
aligned/unaligned pair), calls it, and writes the adapter folder, the method's JSON report and its card.
The closed-form methods read no file and load no model; a method that trains (``refit``) gets the base
handle in its context and runs the training engine (``training/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from salora_merge.errors import InputError

if TYPE_CHECKING:
    import torch

    from salora_merge.core.safety import SafetyModule
    from salora_merge.hf.base_model import BaseModel
    from salora_merge.hf.placement import Placement
    from salora_merge.io.adapter import LoraModule
    from salora_merge.io.prompts import PromptSet
    from salora_merge.progress import Progress

__all__ = ["NEEDS", "MethodOption", "MethodContext", "MethodReport", "Method", "REPAIR_MEASURED", "at_one_rank"]

# What the cards and summaries of the repair methods say: what the repair study (docs/repair-study.md) measured.
REPAIR_MEASURED = (
    "In salora-merge's repair study (docs/repair-study.md, SmolLM2-135M aligned by LoRA and by full fine-tuning, "
    "benign-instruction, arithmetic and JSON adapters) the default refit restored held-out refusals to at least "
    "95% of the aligned model's, far above the shrink curve, keeping all of a JSON-format adapter's task but "
    "52% to 79% of the others', and refused 1 to 4 of 69 benign instructions (the aligned models none); with the "
    "adapter's task prompts distilled by KL and all of the wide boundary set (--task-prompts FILE --distill kl "
    "--boundary-prompts benign-boundary-wide --max-boundary 256) it kept 97% to 100% of the exact tasks and "
    "refused 0 to 5 of 69 over two seeds; one seed on one adapter met the study's whole bar, the other did not. "
    "Those default figures are for the built-in generic-tasks prompts. With prompts discovered from the adapter "
    "(the default now; docs/repair-discovery.md; KL distillation, the wide boundary set, seed 0) on two "
    "arithmetic adapters: trained on whole conversations, discovery found the task's own prompts and kept all of "
    "the task, refusals 96% / 88%, 5 of 69 benign instructions refused; trained on the answer only, it found "
    "generic requests and kept 79%, as generic-tasks did. Check refusals on held-out "
    "harmful prompts, benign refusals and the adapter's task before deployment (`salora-merge repair` measures "
    "them; `salora-merge audit --behavior`)."
)

# What a method can ask for, and how the user gives it (the CLI's options; the API's keywords).
NEEDS = {
    "safety": "a safety module: --safety FILE, or calibrated on the adapter's modules when not given",
    "input_safety": "an input-side safety module: --input-safety FILE (calibrate --side input)",
    "alignment": "an aligned model and the unaligned one it was tuned from: --aligned M (default --base) --unaligned M",
}


@dataclass(frozen=True)
class MethodOption:
    """One option of a method: ``--name`` on the command line (``_`` as ``-``), ``name`` in the API and YAML."""

    name: str
    type: type  # int, float or str
    default: Any
    help: str
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """The value, converted and range-checked; a one-line error naming the option otherwise."""
        if value is None:
            return None
        if isinstance(value, bool) or (self.type is int and isinstance(value, float) and not value.is_integer()):
            raise InputError(f"{self.flag}: expected {self.type.__name__}, got {value!r}")
        try:
            converted = self.type(value)
        except (TypeError, ValueError):
            raise InputError(f"{self.flag}: expected {self.type.__name__}, got {value!r}") from None
        if isinstance(converted, float) and not math.isfinite(converted):
            raise InputError(f"{self.flag}: expected a finite number, got {value!r}")
        if self.minimum is not None and converted < self.minimum:
            raise InputError(f"{self.flag} must be at least {self.minimum:g}, got {value!r}")
        if self.maximum is not None and converted > self.maximum:
            raise InputError(f"{self.flag} must be at most {self.maximum:g}, got {value!r}")
        return converted


@dataclass(frozen=True)
class MethodContext:
    """What the runner gathered for a method: labels for its report and the inputs it declared."""

    base_model: str
    adapter: str
    output: str
    safety: "SafetyModule | None" = None
    safety_label: str = ""
    input_safety: "SafetyModule | None" = None
    input_safety_label: str = ""
    alignments: "Mapping[str, torch.Tensor] | None" = None  # V = W_aligned - W_unaligned per module (d_out, d_in)
    aligned: str = ""
    unaligned: str = ""
    base_weight: "Callable[[str], torch.Tensor] | None" = None  # a module's base weight, (d_out, d_in), float64
    base: "BaseModel | None" = None  # the handle, for methods that run the model (refit)
    progress: "Progress | None" = None
    task_prompts: "PromptSet | None" = None  # given by repair (its held-out part removed); else the option's file
    heldout: int = 0  # repair: discovered task prompts to hold out of the method for its agreement check
    device: str = "auto"  # where a method that runs the model (refit) runs it: auto, cpu or cuda[:N]
    placement: "Placement | None" = None  # or spread over devices by accelerate (--device-map)


class MethodReport(Protocol):
    """A method's result figures: written as JSON, as the adapter's card, and printed by the CLI."""

    def to_json(self) -> dict: ...

    def card(self, adapter_config: Mapping[str, Any]) -> str: ...

    def render(self) -> str: ...


Apply = Callable[["Mapping[str, LoraModule]", MethodContext, Mapping[str, Any]],
                 "tuple[dict[str, LoraModule], MethodReport]"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line: the CLI's help, the docs' method table
    needs: tuple[str, ...]  # keys of NEEDS
    apply: Apply
    options: tuple[MethodOption, ...] = ()
    report_name: str = "salora_realign.json"
    safety_side: str | None = None  # the side its safety module must have (None: either)
    optional: tuple[str, ...] = field(default=())  # NEEDS it uses when given (not required)
    check: Callable[[Mapping[str, Any]], None] | None = None  # cross-option rules
    check_inputs: Callable[[Mapping[str, Any]], None] | None = None  # reads the files its options name (no model)
    keep_moments: bool = False  # needs the safety module's input second moments (calibrate --keep-moments)
    # returns modules of one new rank with scaling 1 (the config is rewritten); a method that does so only for
    # some options leaves it False: a result whose ranks or scalings differ from the adapter's is rewritten too
    rewrites_rank: bool = False

    def __post_init__(self) -> None:
        unknown = [n for n in (*self.needs, *self.optional) if n not in NEEDS]
        if unknown:
            raise ValueError(f"method {self.name}: unknown need {unknown[0]!r}")

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every option with its default filled in, checked; unknown names are an error."""
        known = {o.name: o for o in self.options}
        extra = sorted(set(given) - set(known))
        if extra:
            flags = ", ".join("--" + e.replace("_", "-") for e in extra)
            raise InputError(f"{flags}: not an option of --method {self.name}"
                             + (f" (its options: {', '.join(o.flag for o in self.options)})" if self.options else ""))
        values = {name: option.check(given.get(name, option.default)) for name, option in known.items()}
        if self.check is not None:
            self.check(values)
        return values


def at_one_rank(modules: "Mapping[str, LoraModule]", factors: "Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]"
                ) -> "dict[str, LoraModule]":
    """``modules`` with new factors ``{name: (B, A, scaling)}`` brought to the largest rank among them with scaling
    1 (``core.lowrank.uniform_factors``), in each module's dtype: what a ``rewrites_rank`` method returns."""
    from dataclasses import replace

    from salora_merge.core.lowrank import uniform_factors

    uniform = uniform_factors(dict(factors), max(b.shape[1] for b, _, _ in factors.values()))
    return {name: replace(m, lora_B=uniform[name][0].to(m.lora_B.dtype), lora_A=uniform[name][1].to(m.lora_A.dtype),
                          scaling=1.0) for name, m in modules.items()}
