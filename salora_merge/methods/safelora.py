"""``safelora``: Safe LoRA (Hsu et al., NeurIPS 2024) on a PEFT adapter, the baseline to compare with.

Needs an aligned model and its unaligned base of the same architecture (for SmolLM2 the study's refusal
fine-tune and the original). The runner reads the alignment directions ``V = W_aligned - W_unaligned``
from the two checkpoints, paired by tensor name (:func:`salora_merge.realignment.needs.alignments`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from salora_merge.errors import InputError
from salora_merge.hf.cards import adapter_front_matter
from salora_merge.methods.base import Method, MethodContext, MethodOption
from salora_merge.version import __version__
from salora_merge.readable import Readable

if TYPE_CHECKING:
    import torch

    from salora_merge.io.adapter import LoraModule

__all__ = ["SafeLoraModule", "SafeLoraReport", "safelora_modules", "METHOD", "REPORT_NAME"]

REPORT_NAME = "salora_safelora.json"


@dataclass(frozen=True)
class SafeLoraModule:
    module: str
    cosine: float  # cos(vec(C dW), vec(dW))
    projected: bool
    update_norm: float  # ||s B A||_F before
    norm_after: float  # ||s B' A||_F after (equal to before when not projected)


@dataclass(frozen=True)
class SafeLoraReport(Readable):
    base_model: str
    adapter: str
    aligned: str
    unaligned: str
    threshold: float | None
    top_k: int | None
    modules: tuple[SafeLoraModule, ...]
    output: str

    @property
    def projected(self) -> int:
        return sum(m.projected for m in self.modules)

    def card(self, adapter_config: Mapping[str, Any]) -> str:
        return _card(self)

    def render(self) -> str:
        return render_safelora(self)

    def to_json(self) -> dict:
        data = asdict(self)
        data["projected_modules"] = self.projected
        data["method"] = "safelora"
        data["tool_version"] = __version__
        return data


def safelora_modules(
    modules: Mapping[str, "LoraModule"], alignments: Mapping[str, "torch.Tensor"], threshold: float | None,
    top_k: int | None,
) -> tuple[dict[str, "LoraModule"], list[SafeLoraModule]]:
    """Project the selected modules' ``lora_B`` onto their alignment direction. ``alignments[m]`` is
    ``V``, ``(d_out, d_in)``."""
    from salora_merge.core.projection import update_norm_sq
    from salora_merge.core.safelora_math import (
        safelora_B,
        select_modules,
        update_cosine,
    )

    projected_b = {name: safelora_B(m.lora_B, alignments[name]) for name, m in modules.items()}
    cosines = {name: update_cosine(m.lora_B, projected_b[name], m.lora_A) for name, m in modules.items()}
    chosen = select_modules(cosines, threshold, top_k)
    out, reports = {}, []
    for name, module in modules.items():
        new = replace(module, lora_B=projected_b[name].to(module.lora_B.dtype)) if name in chosen else module
        out[name] = new
        reports.append(SafeLoraModule(
            module=name, cosine=cosines[name], projected=name in chosen,
            update_norm=abs(module.scaling) * update_norm_sq(module.lora_B, module.lora_A) ** 0.5,
            norm_after=abs(module.scaling) * update_norm_sq(new.lora_B, new.lora_A) ** 0.5,
        ))
    return out, reports


def apply_safelora(modules: Mapping[str, "LoraModule"], ctx: MethodContext,
                   options: Mapping[str, Any]) -> tuple[dict[str, "LoraModule"], SafeLoraReport]:
    top_k = options["top_k"]
    threshold = None if top_k is not None else (0.5 if options["threshold"] is None else options["threshold"])
    new, reports = safelora_modules(modules, ctx.alignments, threshold, top_k)
    return new, SafeLoraReport(base_model=ctx.base_model, adapter=ctx.adapter, aligned=ctx.aligned,
                               unaligned=ctx.unaligned, threshold=threshold, top_k=top_k, modules=tuple(reports),
                               output=ctx.output)


def _check(values: Mapping[str, Any]) -> None:
    if values["threshold"] is not None and values["top_k"] is not None:
        raise InputError("give --threshold or --top-k, not both")


def render_safelora(report) -> str:
    """Summary of a Safe LoRA run (``SafeLoraReport``)."""
    rule = f"cosine <= {report.threshold}" if report.threshold is not None else f"{report.top_k} lowest cosines"
    lines = [f"Safe LoRA on {report.adapter}: projected {report.projected} of {len(report.modules)} modules "
             f"({rule}; V = {report.aligned} - {report.unaligned})", "",
             f"{'module':<48}{'cosine':>9}{'projected':>11}{'norm before':>13}{'after':>10}"]
    for m in sorted(report.modules, key=lambda m: m.cosine)[:10]:
        lines.append(f"{m.module:<48}{m.cosine:>9.4f}{'yes' if m.projected else 'no':>11}"
                     f"{m.update_norm:>13.4g}{m.norm_after:>10.4g}")
    lines += ["", f"Wrote {report.output}"]
    return "\n".join(lines)


def _card(report: SafeLoraReport) -> str:
    rule = (f"cosine at most {report.threshold}" if report.threshold is not None
            else f"the {report.top_k} lowest cosines")
    return adapter_front_matter(report.base_model, "lora", "safelora", "safety") + f"""
# Safe LoRA adapter

`{report.adapter}` processed by [salora-merge](https://pypi.org/project/salora-merge/) with Safe LoRA
(Hsu et al., NeurIPS 2024): for each adapted module, `V = W_aligned - W_unaligned`
(`{report.aligned}` minus `{report.unaligned}`), `C = V V^T / ||V||_F`, and `lora_B := C lora_B` where
`cos(vec(C dW), vec(dW))` is {rule}. {report.projected} of {len(report.modules)} modules were projected.
Per-module figures: `{REPORT_NAME}`.

A projected module keeps only the part of its update inside the alignment update's span, often a small
share of it. In salora-merge's safety study (`docs/safety-study.md` in its source) on SmolLM2-135M-Instruct,
the threshold 0.5 projected every module of an eroded adapter: the refusals came back and the adapter's task
improvement went with them; fewer projected modules kept more of the task and restored fewer refusals.
Evaluate refusals on held-out harmful prompts (`salora-merge audit --behavior`) and the adapter's task
before deployment.
"""


METHOD = Method(
    name="safelora",
    summary="Safe LoRA (Hsu et al. 2024): project the least aligned modules onto the alignment update's span.",
    needs=("alignment",),
    apply=apply_safelora,
    options=(
        MethodOption("threshold", float, None, "Project modules whose cos(C dW, dW) is at most this [default: 0.5].",
                     minimum=-1.0, maximum=1.0),
        MethodOption("top_k", int, None, "Project the K modules with the lowest cosine instead.", minimum=0),
    ),
    report_name=REPORT_NAME,
    check=_check,
)
