"""The safety module a command works with: loaded from a file (and checked against the base), or
calibrated now on exactly the modules it needs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from salora_merge.calibration.run import CalibrationOptions, calibrate
from salora_merge.core.safety import SafetyModule, check_same_base
from salora_merge.hf.base_model import BaseModel
from salora_merge.io.safety_file import load_safety_module, save_safety_module
from salora_merge.progress import Progress, silent

__all__ = ["obtain_safety", "load_checked"]


def load_checked(base: BaseModel, path: Path) -> SafetyModule:
    """A safety module file, refused when it was computed for other weights than ``base``'s."""
    safety = load_safety_module(Path(path))
    check_same_base(safety, base.fingerprint, base.model_id, str(path))
    return safety


def obtain_safety(
    base: BaseModel,
    targets: tuple[str, ...],
    safety_path: Path | None,
    calibration: CalibrationOptions | None,
    save_safety: Path | None = None,
    overwrite: bool = False,
    progress: Progress = silent,
) -> tuple[SafetyModule, str]:
    """The safety module to project with: loaded (and checked against the base), or calibrated now on
    exactly ``targets`` (and saved when ``save_safety`` is given). Returns it with a label for reports."""
    if safety_path is not None:
        return load_checked(base, safety_path), str(safety_path)
    options = replace(calibration or CalibrationOptions(), targets=tuple(targets), cap_small_layers=True)
    safety = calibrate(base, options, progress).safety
    if save_safety is not None:
        save_safety_module(safety, Path(save_safety), overwrite=overwrite)
    return safety, str(save_safety) if save_safety else "calibrated for this run (not saved)"


