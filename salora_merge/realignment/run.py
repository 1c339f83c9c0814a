"""Realign: re-project an existing LoRA adapter so it cannot move the base model's safety features."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping

from salora_merge import __version__
from salora_merge.calibration.run import CalibrationOptions, calibrate
from salora_merge.hf.cards import adapter_card
from salora_merge.errors import SafetyModuleError
from salora_merge.io.adapter import Adapter, LoraModule, check_adapter_fits, read_adapter, write_adapter
from salora_merge.io.atomic import atomic_output_dir, check_output_free
from salora_merge.io.checkpoint import CheckpointIndex, open_checkpoint
from salora_merge.io.safety_file import load_safety_module, save_safety_module
from salora_merge.progress import Progress, silent
from salora_merge.core.projection import project_lora_A, project_lora_B, subspace_energy_fraction, update_norm_sq
from salora_merge.hf.resolve import ResolvedModel, resolve_adapter, resolve_model
from salora_merge.core.safety import SafetyModule, check_same_base, random_control

__all__ = ["ModuleReport", "RealignReport", "realign_modules", "both_sides_report", "obtain_safety", "run_realign",
           "REPORT_NAME"]

REPORT_NAME = "salora_realign.json"


@dataclass(frozen=True)
class ModuleReport:
    module: str
    rank: int
    safety_rank: int
    d_out: int
    scaling: float
    update_norm: float  # ||s B A||_F before
    energy_removed: float  # share of ||dW||_F^2 removed (rho before realign)
    random_reference: float  # what a random update of this shape would lose: r_s / d


@dataclass(frozen=True)
class RealignReport:
    base_model: str
    adapter: str
    safety: str
    side: str
    rank: int
    modules: tuple[ModuleReport, ...]
    output: str

    @property
    def total_energy_removed(self) -> float:
        """Removed share of the whole adapter's energy: sum ||U^T dW||^2 / sum ||dW||^2."""
        total = sum(m.update_norm**2 for m in self.modules)
        return sum(m.update_norm**2 * m.energy_removed for m in self.modules) / total if total else 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["total_energy_removed"] = self.total_energy_removed
        data["tool_version"] = __version__
        return data


def realign_modules(
    modules: Mapping[str, LoraModule], safety: SafetyModule, source: str = "safety module"
) -> tuple[dict[str, LoraModule], list[ModuleReport]]:
    """Project every module's LoRA factors through its safety basis. Pure over loaded tensors.

    Output side: ``B' = B - U_s (U_s^T B)``; input side: ``A' = A - (A V) V^T``. Rank, ``A`` (or
    ``B``) and scaling are unchanged.
    """
    out: dict[str, LoraModule] = {}
    reports: list[ModuleReport] = []
    for name, module in modules.items():
        if name not in safety.bases:
            suffix = name.rsplit(".", 1)[-1]
            raise SafetyModuleError(
                f"{source} has no safety basis for {name}; recalibrate with --targets including {suffix}"
            )
        basis = safety.bases[name]
        factor = module.lora_B if safety.side == "output" else module.lora_A.T
        if basis.shape[0] != factor.shape[0]:
            raise SafetyModuleError(
                f"{source}: basis for {name} has {basis.shape[0]} rows but the adapter's "
                f"{'lora_B' if safety.side == 'output' else 'lora_A'} has {factor.shape[0]}"
            )
        if safety.side == "output":
            removed = subspace_energy_fraction(module.lora_B, module.lora_A, basis)
            new = replace(module, lora_B=project_lora_B(module.lora_B, basis))
        else:
            # rho of the transposed update: ||dW V||^2 / ||dW||^2.
            removed = subspace_energy_fraction(module.lora_A.T, module.lora_B.T, basis)
            new = replace(module, lora_A=project_lora_A(module.lora_A, basis))
        out[name] = new
        norm = abs(module.scaling) * update_norm_sq(module.lora_B, module.lora_A) ** 0.5
        reports.append(ModuleReport(
            module=name, rank=module.rank, safety_rank=int(basis.shape[1]), d_out=int(module.lora_B.shape[0]),
            scaling=module.scaling, update_norm=norm, energy_removed=removed,
            random_reference=int(basis.shape[1]) / int(basis.shape[0]),
        ))
    return out, reports


def both_sides_report(outer: ModuleReport, inner: ModuleReport, before: LoraModule, after: LoraModule) -> ModuleReport:
    """One module's figures after projecting both sides: the share of ``||dW||^2`` removed in total, and
    what random subspaces of the same sizes would remove, ``1 - (1 - r_s/d_out)(1 - r_v/d_in)``."""
    total = update_norm_sq(before.lora_B, before.lora_A)
    kept = update_norm_sq(after.lora_B, after.lora_A) / total if total > 0 else 1.0
    reference = 1.0 - (1.0 - outer.random_reference) * (1.0 - inner.random_reference)
    return replace(outer, safety_rank=outer.safety_rank + inner.safety_rank, energy_removed=1.0 - kept,
                   random_reference=reference)


def obtain_safety(
    base: ResolvedModel,
    checkpoint: CheckpointIndex,
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
        safety = load_safety_module(Path(safety_path))
        check_same_base(safety, checkpoint.fingerprint(), base.model_id, str(safety_path))
        return safety, str(safety_path)
    options = replace(calibration or CalibrationOptions(), targets=tuple(targets))
    safety = calibrate(base, options, progress).safety
    if save_safety is not None:
        save_safety_module(safety, Path(save_safety), overwrite=overwrite)
    return safety, str(save_safety) if save_safety else "calibrated for this run (not saved)"


def run_realign(
    base_ref: str,
    adapter_ref: str,
    out: Path,
    safety_path: Path | None = None,
    calibration: CalibrationOptions | None = None,
    save_safety: Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress = silent,
    control_seed: int | None = None,
    input_safety_path: Path | None = None,
) -> RealignReport:
    """Load, check, (calibrate,) project and write a realigned adapter folder at ``out``.

    With ``control_seed``, every basis is replaced by a random one of the same shape (the control). With
    ``input_safety_path`` (an input-side module), both sides are projected: ``B' = C B``, then
    ``A' = A (I - V V^T)``, and the report gives the share of the energy the two together removed.
    """
    out = Path(out)
    check_output_free(out, overwrite)
    if save_safety is not None:
        check_output_free(Path(save_safety), overwrite)
    adapter: Adapter = read_adapter(resolve_adapter(adapter_ref), allow_pickle=allow_pickle)
    base = resolve_model(base_ref)
    checkpoint = open_checkpoint(base.folder)
    check_adapter_fits(adapter, checkpoint.linear_weight_shapes())

    safety, safety_label = obtain_safety(base, checkpoint, tuple(adapter.modules), safety_path, calibration,
                                         save_safety, overwrite, progress)

    if control_seed is not None:
        safety = random_control(safety, control_seed)
        safety_label = f"random control (seed {control_seed}) shaped like {safety_label}"
    new_modules, reports = realign_modules(adapter.modules, safety, safety_label)
    side = safety.side
    if input_safety_path is not None:
        if safety.side != "output":
            raise SafetyModuleError(f"{safety_label}: --input-safety adds the input side to an output-side module; "
                                    "give an output-side --safety")
        inner = load_safety_module(Path(input_safety_path))
        check_same_base(inner, checkpoint.fingerprint(), base.model_id, str(input_safety_path))
        if inner.side != "input":
            raise SafetyModuleError(f"{input_safety_path}: --input-safety must be an input-side module "
                                    "(salora-merge calibrate --side input)")
        if control_seed is not None:
            inner = random_control(inner, control_seed + 1)
        new_modules, inner_reports = realign_modules(new_modules, inner, str(input_safety_path))
        reports = [both_sides_report(outer, inner_report, adapter.modules[outer.module], new_modules[outer.module])
                   for outer, inner_report in zip(reports, inner_reports)]
        side = "both"
        safety_label = f"{safety_label} (output) + {input_safety_path} (input)"
    report = RealignReport(
        base_model=base.model_id, adapter=str(adapter_ref), safety=safety_label, side=side,
        rank=safety.rank, modules=tuple(reports), output=str(out),
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_adapter(tmp, adapter.config, new_modules, adapter.passthrough)
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        (tmp / "README.md").write_text(adapter_card(adapter.config, report, dict(safety.metadata)))
    return report
