"""Realign: apply one method of the registry to an existing LoRA adapter and write the new adapter folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import salora_merge.parallel as parallel
from salora_merge.calibration.run import CalibrationOptions
from salora_merge.core.lora_config import with_uniform_rank
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.placement import Placement
from salora_merge.hf.resolve import resolve_adapter, resolve_model
from salora_merge.io.adapter import (
    Adapter,
    LoraModule,
    check_adapter_fits,
    collapse_params,
    expand_params,
    read_adapter,
    write_adapter,
)
from salora_merge.errors import InputError
from salora_merge.io.atomic import atomic_output_dir, check_output_free
from salora_merge.methods import DEFAULT, get_method
from salora_merge.methods.base import Method, MethodReport
from salora_merge.progress import Progress, silent
from salora_merge.realignment.needs import Sources, gather

# The methods that work module by module from the safety basis alone, so each expert of a fused parameter too.
PARAMETER_METHODS = ("salora", "random", "shrink")

__all__ = ["run_realign", "apply_method", "write_applied", "Applied", "Sources"]


@dataclass(frozen=True)
class Applied:
    """A method applied in memory: the new modules, the PEFT config to write with them, and the method's report."""

    method: Method
    adapter: Adapter
    config: dict
    modules: dict[str, LoraModule]
    report: MethodReport
    base: BaseModel
    params: dict = field(default_factory=dict)  # LoRA on fused expert parameters, by parameter (ParamLora)


def apply_method(base: "str | BaseModel", adapter_ref: str, out: Path, method: str, method_options: Mapping[str, Any],
                 sources: Sources, overwrite: bool = False, allow_pickle: bool = False,
                 progress: Progress = silent, checked: Callable[[BaseModel], None] | None = None) -> Applied:
    """Check the options, the output path and the inputs, gather what the method needs and apply it; nothing is
    written (except a safety module the user asked to save). ``checked`` is called with the base once every
    input has been checked, before the long work."""
    chosen = get_method(method)
    options = chosen.resolve_options({k: v for k, v in (method_options or {}).items() if v is not None})
    check_output_free(Path(out), overwrite)
    if sources.save_safety is not None:
        check_output_free(Path(sources.save_safety), overwrite)
    sources.check_for(chosen)
    if chosen.check_inputs is not None:
        chosen.check_inputs(options)
    adapter: Adapter = read_adapter(resolve_adapter(adapter_ref), allow_pickle=allow_pickle)
    base = resolve_model(base)
    if adapter.spec.target_parameters and chosen.name not in PARAMETER_METHODS:
        raise InputError(f"{adapter.path}: a LoRA on fused expert parameters (target_parameters) can be realigned "
                         f"with --method {', '.join(PARAMETER_METHODS)}, not {chosen.name}")
    adapter = base.bind(adapter)
    check_adapter_fits(adapter, base.module_weight_shapes, parameters=True)
    if checked is not None:
        checked(base)
    # Each expert of a LoRA on a fused parameter is a module of its own for the method (its own safety basis).
    flat = replace(adapter, modules={**adapter.modules, **expand_params(adapter.params)})
    ctx = gather(chosen, base, flat, str(adapter_ref), str(out), sources, overwrite, progress)
    new_flat, report = chosen.apply(flat.modules, ctx, options)
    new_modules = {n: m for n, m in new_flat.items() if n in adapter.modules}
    params = collapse_params(adapter.params, new_flat)
    config = adapter.config
    rewritten = any(m.rank != adapter.modules[n].rank or m.scaling != adapter.modules[n].scaling
                    for n, m in new_modules.items())
    if chosen.rewrites_rank or rewritten:  # every module now has one rank and scaling 1
        ranks = {m.rank for m in new_modules.values()}
        assert len(ranks) == 1 and all(m.scaling == 1.0 for m in new_modules.values()), chosen.name
        config = with_uniform_rank(adapter.config, ranks.pop())
    return Applied(chosen, adapter, config, new_modules, report, base, params)


def write_applied(applied: Applied, out: Path, overwrite: bool = False, extra: Mapping[str, str] | None = None,
                  card: str | None = None) -> None:
    """The adapter folder (stock PEFT), the method's JSON report, ``extra`` files and the card, atomically; under
    torchrun rank 0 writes and the other ranks wait for it."""
    if not parallel.is_main():
        parallel.barrier()
        return
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        write_adapter(tmp, applied.config, applied.modules, applied.adapter.passthrough, applied.params)
        (tmp / applied.method.report_name).write_text(json.dumps(applied.report.to_json(), indent=2) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        (tmp / "README.md").write_text(card if card is not None else applied.report.card(applied.config))
    parallel.barrier()


def run_realign(
    base: "str | BaseModel",
    adapter_ref: str,
    out: Path,
    safety_path: Path | None = None,
    calibration: CalibrationOptions | None = None,
    save_safety: Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress = silent,
    method: str = DEFAULT,
    method_options: Mapping[str, Any] | None = None,
    input_safety_path: Path | None = None,
    aligned: "str | BaseModel | None" = None,
    unaligned: "str | BaseModel | None" = None,
    device: str = "auto",
    placement: "Placement | None" = None,
) -> MethodReport:
    """Load and check the adapter, gather what ``method`` needs, apply it, and write the adapter folder
    (stock PEFT), the method's JSON report and its card at ``out``; nothing is written on error.

    ``salora`` given an input-side module as well (``input_safety_path``) projects both sides, as
    ``both-sides`` does.
    """
    name = "both-sides" if method == "salora" and input_safety_path is not None else method
    sources = Sources(safety=safety_path, calibration=calibration, save_safety=save_safety,
                      input_safety=input_safety_path, aligned=aligned, unaligned=unaligned, device=device,
                      placement=placement)
    applied = apply_method(base, adapter_ref, Path(out), name, method_options or {}, sources, overwrite,
                           allow_pickle, progress)
    write_applied(applied, Path(out), overwrite)
    return applied.report
