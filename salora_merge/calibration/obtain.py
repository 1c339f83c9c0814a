"""The safety module a command works with: loaded from a file (and checked against the base), or
calibrated now on exactly the modules it needs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from salora_merge.calibration.run import CalibrationOptions, calibrate
from salora_merge.core.safety import SafetyModule, check_same_base
from salora_merge.errors import SafetyModuleError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.chat_templates import NAMED, RAW
from salora_merge.io.prompts import load_prompt_set
from salora_merge.io.safety_file import load_safety_module, save_safety_module
from salora_merge.progress import Progress, silent

__all__ = ["obtain_safety", "load_checked", "completed"]


def load_checked(base: BaseModel, path: Path) -> SafetyModule:
    """A safety module file, refused when it was computed for other weights than ``base``'s."""
    safety = load_safety_module(Path(path))
    check_same_base(safety, base.fingerprint, base.model_id, str(path))
    shapes = base.module_weight_shapes
    for name, basis in safety.bases.items():
        shape = shapes.get(name)
        if shape is not None and len(shape) == 2 and basis.shape[0] not in shape:  # (d_out, d_in), or Conv1D's
            raise SafetyModuleError(f"{path}: basis::{name} has {basis.shape[0]} rows, but the base's {name} is "
                                    f"{shape[0]} x {shape[1]}; the file is corrupt or for another model: "
                                    "recalibrate it (salora-merge calibrate)")
    return safety


def obtain_safety(
    base: BaseModel,
    targets: tuple[str, ...],
    safety_path: Path | None,
    calibration: CalibrationOptions | None,
    save_safety: Path | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
    must_cover: bool = True,
) -> tuple[SafetyModule, str]:
    """The safety module to project with: loaded (and checked against the base; bases it lacks for ``targets``
    calibrated now with its own settings, or, when that cannot be done exactly, an error, or with ``must_cover``
    False the module as it is), or calibrated now on exactly ``targets`` (and saved when ``save_safety`` is
    given). Returns it with a label for reports."""
    if safety_path is not None:
        safety = load_checked(base, safety_path)
        missing = tuple(t for t in targets if t not in safety.bases)
        if not missing:
            return safety, str(safety_path)
        try:
            return completed(base, safety, missing, str(safety_path), calibration, progress)
        except SafetyModuleError:
            if must_cover:
                raise
            return safety, str(safety_path)  # the caller reports each module it lacks
    options = replace(calibration or CalibrationOptions(), targets=tuple(targets), cap_small_layers=True)
    safety = calibrate(base, options, progress).safety
    if save_safety is not None:
        save_safety_module(safety, Path(save_safety), overwrite=overwrite)
    return safety, str(save_safety) if save_safety else "calibrated for this run (not saved)"




def _digest(spec: str) -> str | None:
    try:
        return load_prompt_set(spec).digest()
    except Exception:  # noqa: BLE001 - a set that cannot be read is not the one recorded
        return None


def _same_settings(safety: SafetyModule, source: str, missing: tuple[str, ...],
                   calibration: CalibrationOptions | None) -> CalibrationOptions:
    """The calibration that made ``safety``, from its metadata, for ``missing`` modules; an error naming why when
    it cannot be repeated exactly (its prompt set is not at hand or changed, contrastive or energy-ranked bases,
    a given-response file)."""
    meta = safety.metadata
    first = missing[0]
    fix = f"recalibrate with --targets including {first.rsplit('.', 1)[-1]}"
    if meta.get("contrast_prompt_set") or meta.get("energy") is not None:
        raise SafetyModuleError(f"{source} has no safety basis for {first}, and its contrastive or energy-ranked "
                                f"bases cannot be extended here; {fix}")
    if meta.get("responses") not in ("self", "none"):
        raise SafetyModuleError(f"{source} has no safety basis for {first}, and it was calibrated on given "
                                f"responses that are not at hand; {fix}")
    name = str(meta.get("prompt_set", ""))
    name = next((spec for spec in dict.fromkeys([name, calibration.prompts if calibration else name])
                 if _digest(spec) == meta.get("prompt_set_sha256")), None)
    if name is None:
        raise SafetyModuleError(f"{source} has no safety basis for {first}, and the prompt set it was calibrated "
                                f"on ({meta.get('prompt_set')}) is not at hand: give that file with --prompts, or "
                                f"{fix}")
    label = str(meta.get("chat_template") or "model")
    if label == "model" or label.startswith("none (the model has no"):
        template = None
    elif label.startswith("none (raw"):
        template = RAW
    elif label.split(" ", 1)[0] in NAMED:
        template = label.split(" ", 1)[0]
    else:
        raise SafetyModuleError(f"{source} has no safety basis for {first}, and the chat template file it was "
                                f"calibrated with ({label}) is not at hand; {fix}")
    given = calibration or CalibrationOptions()
    return replace(given, prompts=name, chat_template=template, responses=meta["responses"], rank=int(meta["rank"]), side=safety.side,
                   targets=missing, cap_small_layers=True, token_policy=meta.get("token_policy"),
                   extra_policies=(), keep_moments=False, max_prompts=None,
                   max_length=int(meta.get("max_length") or given.max_length),
                   max_new_tokens=int(meta.get("max_new_tokens") or given.max_new_tokens), energy=None,
                   contrast=None)


def completed(base: BaseModel, safety: SafetyModule, missing: tuple[str, ...], source: str,
              calibration: CalibrationOptions | None, progress: Progress = silent) -> tuple[SafetyModule, str]:
    """``safety`` with bases for the ``missing`` modules (an adapter's ``lm_head``, say) calibrated now with the
    settings it records (the same prompts, responses, token policy and rank), and a label that says so."""
    options = _same_settings(safety, source, missing, calibration)
    extra = calibrate(base, options, progress).safety
    merged = replace(safety, bases={**safety.bases, **extra.bases}, eigenvalues={**safety.eigenvalues,
                                                                                  **extra.eigenvalues},
                     sites={**safety.sites, **extra.sites})
    names = ", ".join(m.rsplit(".", 1)[-1] if m.count(".") else m for m in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return merged, (f"{source} + {len(missing)} module(s) it lacked ({names}{more}) calibrated now with its "
                    "settings (not saved)")
