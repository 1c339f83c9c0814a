"""``realign --method safelora``: Safe LoRA (Hsu et al., 2024) on a PEFT adapter, the baseline to compare with.

Needs an aligned model and its unaligned base of the same architecture (for SmolLM2 the study's refusal
fine-tune and the original). The alignment directions ``V = W_aligned - W_unaligned`` are read one
module at a time from the two checkpoints and paired by tensor name, never by position.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping

import torch

from salora_merge import __version__
from salora_merge.hf.cards import front_matter, is_hub_id
from salora_merge.errors import InputError
from salora_merge.io.adapter import Adapter, LoraModule, check_adapter_fits, read_adapter, write_adapter
from salora_merge.io.atomic import atomic_output_dir, check_output_free
from salora_merge.io.checkpoint import CheckpointIndex, open_checkpoint
from salora_merge.core.projection import update_norm_sq
from salora_merge.hf.resolve import resolve_adapter, resolve_model
from salora_merge.core.safelora_math import safelora_B, select_modules, update_cosine

__all__ = ["SafeLoraModule", "SafeLoraReport", "safelora_modules", "run_safelora", "REPORT_NAME"]

REPORT_NAME = "salora_safelora.json"


@dataclass(frozen=True)
class SafeLoraModule:
    module: str
    cosine: float  # cos(vec(C dW), vec(dW))
    projected: bool
    update_norm: float  # ||s B A||_F before
    norm_after: float  # ||s B' A||_F after (equal to before when not projected)


@dataclass(frozen=True)
class SafeLoraReport:
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

    def to_json(self) -> dict:
        data = asdict(self)
        data["projected_modules"] = self.projected
        data["method"] = "safelora"
        data["tool_version"] = __version__
        return data


def safelora_modules(
    modules: Mapping[str, LoraModule], alignments: Mapping[str, torch.Tensor], threshold: float | None,
    top_k: int | None,
) -> tuple[dict[str, LoraModule], list[SafeLoraModule]]:
    """Project the selected modules' ``lora_B`` onto their alignment direction. ``alignments[m]`` is
    ``V``, ``(d_out, d_in)``."""
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


def _alignment(aligned: CheckpointIndex, unaligned: CheckpointIndex, module: str, fan_in_fan_out: bool,
               labels: tuple[str, str]) -> torch.Tensor:
    name = f"{module}.weight"
    for index, label in ((aligned, labels[0]), (unaligned, labels[1])):
        if name not in index.files:
            raise InputError(f"{label}: has no tensor {name}; --aligned and --unaligned must be the adapter's "
                             "architecture")
    if aligned.shapes[name] != unaligned.shapes[name]:
        raise InputError(f"{name} has shape {aligned.shapes[name]} in --aligned but {unaligned.shapes[name]} in "
                         "--unaligned; they must be two versions of one architecture")
    v = aligned.read(name).to(torch.float64) - unaligned.read(name).to(torch.float64)
    return v.T if fan_in_fan_out else v


def run_safelora(
    base_ref: str,
    adapter_ref: str,
    out: Path,
    aligned_ref: str | None,
    unaligned_ref: str,
    threshold: float | None = 0.5,
    top_k: int | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> SafeLoraReport:
    """Apply Safe LoRA to ``adapter_ref`` and write the adapter folder (with a report) at ``out``."""
    if top_k is not None and top_k < 0:
        raise InputError(f"--top-k must be at least 0, got {top_k}")
    if top_k is not None:
        threshold = None
    out = Path(out)
    check_output_free(out, overwrite)
    adapter: Adapter = read_adapter(resolve_adapter(adapter_ref), allow_pickle=allow_pickle)
    base = resolve_model(base_ref)
    check_adapter_fits(adapter, open_checkpoint(base.folder).linear_weight_shapes())
    aligned_label = aligned_ref or base_ref
    aligned = open_checkpoint(resolve_model(aligned_label).folder)
    unaligned = open_checkpoint(resolve_model(unaligned_ref).folder)
    if aligned.fingerprint() == unaligned.fingerprint():
        raise InputError(f"--aligned {aligned_label} and --unaligned {unaligned_ref} are the same weights; Safe LoRA "
                         "needs an aligned model and its unaligned base")
    labels = (f"--aligned {aligned_label}", f"--unaligned {unaligned_ref}")
    alignments = {name: _alignment(aligned, unaligned, name, adapter.spec.fan_in_fan_out, labels)
                  for name in adapter.modules}
    for name, v in alignments.items():
        if not torch.any(v != 0):
            raise InputError(f"{name}.weight is identical in --aligned and --unaligned: no alignment direction "
                             "for that module; leave it out of the adapter or pick the right pair")
    new_modules, reports = safelora_modules(adapter.modules, alignments, threshold, top_k)
    report = SafeLoraReport(base_model=base.model_id, adapter=str(adapter_ref), aligned=aligned_label,
                            unaligned=unaligned_ref, threshold=threshold, top_k=top_k, modules=tuple(reports),
                            output=str(out))
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_adapter(tmp, adapter.config, new_modules, adapter.passthrough)
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        (tmp / "README.md").write_text(_card(report))
    return report


def _card(report: SafeLoraReport) -> str:
    hub_id = report.base_model if is_hub_id(report.base_model) else None
    fields = {"base_model": hub_id, "library_name": "peft", "pipeline_tag": "text-generation",
              "tags": ([f"base_model:adapter:{hub_id}"] if hub_id else []) + ["lora", "safelora", "safety"]}
    rule = (f"cosine at most {report.threshold}" if report.threshold is not None
            else f"the {report.top_k} lowest cosines")
    return front_matter(fields) + f"""
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
