"""The public Python API: one function per command, typed options in, typed results out.

The CLI calls exactly these functions. Every function resolves its ``base`` once (a folder, a Hub id
``org/name[@rev]``, a built-in alias, or a :class:`BaseModel` handle from :func:`open_base`) and passes
the handle down. Errors are :class:`salora_merge.errors.SaloraError` subclasses whose message is one
line naming the file, tensor or option and the fix; nothing is left half-written.

    >>> import salora_merge as sm
    >>> base = sm.open_base("smollm2-135m-instruct")
    >>> safety = sm.calibrate(base, sm.CalibrationOptions(max_prompts=32), output="s.safetensors")
    >>> report = sm.realign(base, "my-lora", "my-lora-realigned", safety="s.safetensors")
    >>> sm.merge(base, ["my-lora-realigned"], "merged")

See docs/api.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from salora_merge.auditing.behavior import BehaviorOptions
from salora_merge.auditing.run import AuditOptions, run_audit
from salora_merge.calibration.run import Calibration, CalibrationOptions
from salora_merge.calibration.run import calibrate as _calibrate
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.placement import Placement
from salora_merge.hf.resolve import resolve_model
import salora_merge.parallel as parallel
from salora_merge.io.atomic import check_output_free
from salora_merge.merging.report import MergeReport
from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge
from salora_merge.methods import DEFAULT, REGISTRY
from salora_merge.methods.base import MethodReport
from salora_merge.progress import Progress, silent, tqdm_progress
from salora_merge.publishing.push import PushResult
from salora_merge.realignment.run import run_realign
from salora_merge.repairing.report import RepairReport
from salora_merge.repairing.run import RepairOptions, run_repair
from salora_merge.training.options import TrainOptions, TrainReport
from salora_merge.training.retrain import (
    RetrainOptions,
    RetrainReport,
    defaults_from_adapter,
    run_retrain,
)
from salora_merge.training.runs import RunControl

__all__ = [
    "open_base", "calibrate", "realign", "repair", "merge", "audit", "train", "retrain", "push", "run",
    "BaseModel", "CalibrationOptions", "Calibration", "MergeOptions", "AdapterInput", "MergeReport",
    "AuditOptions", "BehaviorOptions", "TrainOptions", "TrainReport", "RetrainOptions", "RetrainReport",
    "RunControl", "PushResult", "MethodReport", "RepairOptions", "RepairReport", "METHODS", "tqdm_progress",
]

Base = "str | BaseModel"
METHODS = tuple(REGISTRY)  # the realign methods' names, the default first


def open_base(base: Base) -> BaseModel:
    """The base-model handle: resolved once (alias dequantized, Hub snapshot fetched), checkpoint opened lazily."""
    return resolve_model(base)


def calibrate(base: Base, options: CalibrationOptions = CalibrationOptions(), *, output: Path | None = None,
              overwrite: bool = False, progress: Progress = silent) -> Calibration:
    """The safety module of ``base`` from calibration prompts; written to ``output`` when given."""
    from salora_merge.io.safety_file import save_safety_module

    options.validate()
    if output is not None:
        check_output_free(Path(output), overwrite)
    result = _calibrate(resolve_model(base), options, progress)
    if output is not None and parallel.is_main():  # under torchrun only rank 0 writes (every rank holds the sums)
        save_safety_module(result.safety, Path(output), overwrite=overwrite)
    parallel.barrier()
    return result


def realign(base: Base, adapter: str, output: Path, *, method: str = DEFAULT,
            method_options: Mapping[str, Any] | None = None, safety: Path | None = None,
            calibration: CalibrationOptions | None = None, save_safety: Path | None = None,
            input_safety: Path | None = None, aligned: Base | None = None, unaligned: Base | None = None,
            overwrite: bool = False, allow_pickle: bool = False, progress: Progress = silent,
            device: str = "auto", placement: "Placement | None" = None) -> MethodReport:
    """Apply a realign method (``METHODS``; options per ``salora_merge.methods.REGISTRY[name].options``) to a
    PEFT adapter and write the new adapter folder; without ``safety``, methods that need one calibrate it.
    ``device`` and ``placement``: where a method that runs the model (refit) runs it."""
    if calibration is not None:
        calibration.validate()
    return run_realign(resolve_model(base), adapter, Path(output), safety_path=safety, calibration=calibration,
                       save_safety=save_safety, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress,
                       method=method, method_options=method_options, input_safety_path=input_safety,
                       aligned=aligned, unaligned=unaligned, device=device, placement=placement)


def repair(base: Base, adapter: str, output: Path, options: RepairOptions = RepairOptions(), *,
           method_options: Mapping[str, Any] | None = None, safety: Path | None = None,
           calibration: CalibrationOptions | None = None, aligned: Base | None = None, unaligned: Base | None = None,
           overwrite: bool = False, allow_pickle: bool = False, progress: Progress = silent,
           warn: Callable[[str], None] | None = None) -> RepairReport:
    """Repair an eroded adapter with ``options.method`` (default ``refit``) and measure the base, the adapter and
    the repaired adapter on held-out prompts; writes a stock PEFT adapter folder with ``salora_repair.json``.
    ``warn`` gets one-line warnings (a base that refuses too little to repair; fewer held-out prompts)."""
    if calibration is not None:
        calibration.validate()
    return run_repair(resolve_model(base), adapter, Path(output), options, method_options=method_options,
                      safety_path=safety, calibration=calibration, aligned=aligned, unaligned=unaligned,
                      overwrite=overwrite, allow_pickle=allow_pickle, progress=progress, warn=warn)


def merge(base: Base, adapters: Sequence["str | AdapterInput"], output: Path,
          options: MergeOptions = MergeOptions(), *, safety: Path | None = None,
          calibration: CalibrationOptions | None = None, overwrite: bool = False, allow_pickle: bool = False,
          progress: Progress = silent) -> MergeReport:
    """Merge adapters (weight 1 each unless given as :class:`AdapterInput`) into the base, out of core."""
    if calibration is not None:
        calibration.validate()
    inputs = [a if isinstance(a, AdapterInput) else AdapterInput(str(a)) for a in adapters]
    return run_merge(resolve_model(base), inputs, Path(output), options, safety_path=safety,
                     calibration=calibration, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)


def audit(base: Base, adapters: Sequence[str], options: AuditOptions = AuditOptions(), *,
          safety: Path | None = None, calibration: CalibrationOptions | None = None, progress: Progress = silent,
          judge=None, warn: Callable[[str], None] | None = None) -> dict:
    """Audit adapters (folders, Hub ids, or folders of adapter folders). Returns the versioned report
    (``docs/audit-report.schema.json``); :func:`salora_merge.auditing.run.exit_code` gives its gate result.
    ``warn`` gets a one-line warning when the base refuses too little for erosion to show (with behaviour)."""
    if calibration is not None:
        calibration.validate()
    return run_audit(resolve_model(base), adapters, options, safety_path=safety, calibration=calibration,
                     progress=progress, judge=judge, warn=warn)


def train(base: Base, data: Path, safety: Path | None, output: Path, options: TrainOptions = TrainOptions(), *,
          control: RunControl | None = None, progress: Progress = silent,
          echo: Callable[[str], None] | None = None) -> TrainReport:
    """Train a new adapter on a JSONL file, with refusal anchors in every batch unless
    ``options.keep_refusals.enabled`` is off, and export it as a stock PEFT LoRA at ``output``. ``safety``: a
    safety module for SaLoRA's fixed constraint (the paper's setting); None trains plain LoRA."""
    from salora_merge.training.data import conversations_digest, load_conversations
    from salora_merge.training.train import run_train

    options.validate()
    control = control or RunControl(out=Path(output))
    conversations = load_conversations(Path(data))
    return run_train(resolve_model(base), conversations, str(data), conversations_digest(conversations),
                     Path(safety) if safety is not None else None, options, control, progress=progress, echo=echo)


def retrain(base: Base, adapter: str, safety: Path | None, output: Path, options: RetrainOptions, *,
            training: TrainOptions | None = None, inherit: Mapping[str, Any] | None = None,
            control: RunControl | None = None, progress: Progress = silent,
            echo: Callable[[str], None] | None = None) -> RetrainReport:
    """Re-learn ``adapter`` from its data or by distillation, with refusal anchors (and under SaLoRA's constraint
    when ``safety`` is given). Rank, alpha, rsLoRA and targets come from the old adapter unless ``inherit`` gives
    them (``{"rank": 8, ...}``)."""
    options.validate()
    given = {"rank": None, "alpha": None, "use_rslora": None, "targets": None, **(inherit or {})}
    training = defaults_from_adapter(adapter, training or TrainOptions(), given, options.allow_pickle)
    training.validate()
    control = control or RunControl(out=Path(output))
    return run_retrain(resolve_model(base), adapter, Path(safety) if safety is not None else None, options,
                       training, control, progress=progress, echo=echo)


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, endpoint: str | None = None) -> PushResult:
    """Upload a model or adapter folder written by salora-merge to the Hub in one commit (token from
    ``HF_TOKEN`` or ``hf auth login``; never printed or stored)."""
    from salora_merge.publishing.push import push_folder

    return push_folder(Path(folder), repo_id, private=private, revision=revision, create_pr=create_pr,
                       commit_message=commit_message, endpoint=endpoint)


def run(config: Path, *, dry_run: bool = False, echo: Callable[[str], None] = print,
        progress: Progress = silent) -> list[dict]:
    """Run (or plan, with ``dry_run``) a YAML pipeline; returns one record per step."""
    from salora_merge.pipeline.config import load_pipeline
    from salora_merge.pipeline.run import run_pipeline

    return run_pipeline(load_pipeline(Path(config)), dry_run=dry_run, echo=echo, progress=progress)
