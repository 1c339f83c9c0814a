"""Gather what a method declared it needs (safety modules, the aligned/unaligned pair) for one adapter."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from salora_merge.calibration.obtain import load_checked, obtain_safety
from salora_merge.calibration.run import CalibrationOptions
from salora_merge.errors import InputError, SafetyModuleError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.placement import Placement
from salora_merge.hf.resolve import resolve_model
from salora_merge.io.adapter import Adapter
from salora_merge.io.checkpoint import CheckpointIndex
from salora_merge.io.prompts import PromptSet
from salora_merge.methods.base import Method, MethodContext
from salora_merge.progress import Progress, silent

__all__ = ["Sources", "gather", "alignments"]


@dataclass(frozen=True)
class Sources:
    """Where the needs come from, as the user gave them (each used only by methods that need it)."""

    safety: Path | None = None  # a safety module file; None: calibrate with ``calibration``
    calibration: CalibrationOptions | None = None
    save_safety: Path | None = None
    input_safety: Path | None = None
    aligned: "str | BaseModel | None" = None  # default: the base
    unaligned: "str | BaseModel | None" = None
    task_prompts: "PromptSet | None" = None  # repair: the task prompts left for the method (the rest held out)
    heldout: int = 0  # repair: discovered task prompts to hold out of the method (when it discovers them)
    device: str = "auto"  # where a method that runs the model (refit) runs it
    placement: "Placement | None" = None  # or spread over devices (--device-map)

    def check_for(self, method: Method) -> None:
        """Refuse sources the method does not use, and missing required ones, naming the option."""
        uses = set(method.needs) | set(method.optional)
        if "safety" not in uses and (self.safety is not None or self.save_safety is not None):
            raise InputError(f"--method {method.name} uses no safety module; drop --safety and --save-safety")
        if "input_safety" not in uses and self.input_safety is not None:
            raise InputError(f"--input-safety belongs to --method both-sides (or random); --method {method.name} "
                             "does not use it")
        if "alignment" not in uses and (self.aligned is not None or self.unaligned is not None):
            raise InputError(f"--aligned and --unaligned belong to the methods that use the aligned/unaligned "
                             f"pair (safelora, resta); --method {method.name} does not use them")
        if "input_safety" in method.needs and self.input_safety is None:
            raise InputError(f"--method {method.name} needs --input-safety FILE (calibrate --side input)")
        if "alignment" in method.needs and self.unaligned is None:
            raise InputError(f"--method {method.name} needs --unaligned MODEL (the model the aligned one was "
                             "tuned from)")


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


def alignments(base: BaseModel, adapter: Adapter, aligned_ref: "str | BaseModel | None",
               unaligned_ref: "str | BaseModel") -> tuple[dict[str, torch.Tensor], str, str]:
    """``V = W_aligned - W_unaligned`` of every adapted module (float64, ``(d_out, d_in)``), read one tensor
    at a time and paired by tensor name; with the two labels for reports."""
    aligned = base if aligned_ref is None else resolve_model(aligned_ref)
    unaligned = resolve_model(unaligned_ref)
    aligned_label = aligned.ref if aligned_ref is not None else base.ref
    unaligned_label = unaligned.ref
    if aligned.fingerprint == unaligned.fingerprint:
        raise InputError(f"--aligned {aligned_label} and --unaligned {unaligned_label} are the same weights; Safe "
                         "LoRA needs an aligned model and its unaligned base")
    labels = (f"--aligned {aligned_label}", f"--unaligned {unaligned_label}")
    out = {name: _alignment(aligned.checkpoint, unaligned.checkpoint, name, adapter.spec.fan_in_fan_out, labels)
           for name in adapter.modules}
    for name, v in out.items():
        if not torch.any(v != 0):
            raise InputError(f"{name}.weight is identical in --aligned and --unaligned: no alignment direction "
                             "for that module; leave it out of the adapter or pick the right pair")
    return out, aligned_label, unaligned_label


def gather(method: Method, base: BaseModel, adapter: Adapter, adapter_label: str, output: str, sources: Sources,
           overwrite: bool = False, progress: Progress = silent) -> MethodContext:
    """The method's context: every need loaded (or calibrated) and checked against the base. The caller has
    checked ``sources`` against the method (``Sources.check_for``) before reading the adapter."""
    fan_in_fan_out = adapter.spec.fan_in_fan_out

    def base_weight(name: str) -> torch.Tensor:
        w = base.checkpoint.read(f"{name}.weight").to(torch.float64)
        return w.T if fan_in_fan_out else w

    ctx = MethodContext(base_model=base.model_id, adapter=adapter_label, output=output, base_weight=base_weight,
                        base=base, progress=progress, task_prompts=sources.task_prompts, heldout=sources.heldout,
                        device=sources.device, placement=sources.placement)
    uses = set(method.needs) | set(method.optional)
    if "safety" in method.needs:
        calibration = sources.calibration
        if method.safety_side is not None and sources.safety is None:
            calibration = replace(calibration or CalibrationOptions(), side=method.safety_side)
        if method.keep_moments and sources.safety is None:
            calibration = replace(calibration or CalibrationOptions(), keep_moments=True)
        safety, label = obtain_safety(base, tuple(adapter.modules), sources.safety, calibration,
                                      sources.save_safety, overwrite, progress)
        if method.safety_side is not None and safety.side != method.safety_side:
            raise SafetyModuleError(f"{label}: --method {method.name} needs an {method.safety_side}-side safety "
                                    f"module, this one is {safety.side}-side")
        ctx = replace(ctx, safety=safety, safety_label=label)
    elif "safety" in method.optional and sources.safety is not None:
        ctx = replace(ctx, safety=load_checked(base, sources.safety), safety_label=str(sources.safety))
    if "input_safety" in uses and sources.input_safety is not None:
        ctx = replace(ctx, input_safety=load_checked(base, sources.input_safety),
                      input_safety_label=str(sources.input_safety))
    if "alignment" in method.needs:
        found, aligned, unaligned = alignments(base, adapter, sources.aligned, sources.unaligned)
        ctx = replace(ctx, alignments=found, aligned=aligned, unaligned=unaligned)
    return ctx
