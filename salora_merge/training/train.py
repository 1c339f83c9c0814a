"""SaLoRA training: task-specific initialization, training under the fixed safety module, portable export.

Order (method.md sections 2-4): every statistic is collected from the unmodified model first; then each
target weight is replaced in place by ``W_res = W - s C B0 A0`` and the layer computes
``W_res x + s C (B (A x))`` while ``A``, ``B`` train with ``C`` fixed; the result is written as a plain PEFT
LoRA of rank ``2r`` that stock PEFT loads on the untouched base.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from salora_merge import __version__
from salora_merge.core.audit_math import module_scores, summarize
from salora_merge.calibration.run import accumulate_moments, select_targets
from salora_merge.hf.cards import trained_adapter_card
from salora_merge.errors import InputError, SafetyModuleError
from salora_merge.io.adapter import LoraModule, write_adapter
from salora_merge.io.atomic import atomic_output_dir, check_output_free
from salora_merge.io.checkpoint import open_checkpoint
from salora_merge.io.stream import file_sha256
from salora_merge.io.safety_file import load_safety_module
from salora_merge.hf.models import linear_modules, load_causal_lm, load_tokenizer, pick_device, weight_matrix
from salora_merge.progress import Progress, silent
from salora_merge.hf.resolve import ResolvedModel, resolve_model
from salora_merge.core.safety import SafetyModule, check_same_base, compute_safety_bases, random_control
from salora_merge.training.layer import LayerInit, SaLoRALinear, inject
from salora_merge.training.data import TokenizedExample, tokenize_all
from salora_merge.training.trainer import FitOptions, FitResult, fit, last_checkpoint, read_state
from salora_merge.core.training_math import (INITS, export_alpha, export_factors, gaussian_init, pissa_init, residual_weight,
                            salora_init)

__all__ = ["TrainOptions", "TrainReport", "PreparedModel", "TrainedAdapter", "prepare_model", "export_modules",
           "adapter_config", "prepare_run", "train_adapter", "write_trained", "run_train",
           "RunControl", "is_main_process", "REPORT_NAME", "RUN_NAME"]

REPORT_NAME = "salora_train.json"
RUN_NAME = "salora_train_run.json"


@dataclass(frozen=True)
class TrainOptions:
    rank: int = 16
    alpha: float = 16.0
    use_rslora: bool = False
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    task_rank: int = 32
    init: str = "gaussian"  # the safety study: the task-specific init moved the weights ~5x more at the same lr
    init_samples: int = 128
    dropout: float = 0.0
    max_length: int = 512
    device: str = "auto"
    random_control: int | None = None  # seed: train against random subspaces of the same sizes (the control)
    fit: FitOptions = field(default_factory=FitOptions)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5) if self.use_rslora else self.alpha / self.rank

    def validate(self) -> None:
        problems = []
        for name, value in (("--rank", self.rank), ("--task-rank", self.task_rank),
                            ("--init-samples", self.init_samples), ("--max-length", self.max_length),
                            ("--batch-size", self.fit.batch_size), ("--grad-accum", self.fit.grad_accum),
                            ("--save-steps", self.fit.save_steps)):
            if value <= 0:
                problems.append(f"{name} must be positive, got {value}")
        if self.init not in INITS:
            problems.append(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.fit.lr <= 0:
            problems.append(f"--lr must be positive, got {self.fit.lr}")
        if self.fit.max_steps <= 0 and self.fit.epochs <= 0:
            problems.append(f"--epochs must be positive, got {self.fit.epochs}")
        if self.alpha == 0:
            problems.append("--alpha must not be 0 (the update would be switched off)")
        if not self.targets:
            problems.append("--targets is empty")
        if problems:
            raise InputError("; ".join(problems))

    def run_key(self) -> dict:
        """The options that change what is trained (not how it is shown or saved)."""
        data = asdict(self)
        fit_options = data.pop("fit")
        for key in ("save_steps", "save_total_limit", "logging_steps", "show_progress", "device"):
            fit_options.pop(key)
        data.pop("device")
        return json.loads(json.dumps({**data, **fit_options}))  # flat, and as it reads back from JSON


@dataclass
class PreparedModel:
    """A model with SaLoRA layers in place, and what export needs."""

    model: torch.nn.Module
    tokenizer: object
    layers: dict[str, SaLoRALinear]
    seconds_init: float
    task_tokens: int
    linear_names: list[str] = field(default_factory=list)  # every linear layer of the base, before injection


@dataclass(frozen=True)
class TrainReport:
    base_model: str
    data: str
    data_sha256: str
    examples: int
    learned_tokens: int
    safety: str
    safety_rank: int
    init: str
    rank: int
    alpha: float
    use_rslora: bool
    task_rank: int
    task_tokens: int
    export_rank: int
    export_alpha: float
    modules: int
    global_step: int
    train_loss: float
    losses: tuple[tuple[int, float], ...]
    safety_energy: float  # share of the exported update's energy inside the safety subspace (0 by design)
    seconds_init: float
    seconds_train: float
    resumed_from: str | None
    output: str
    merged: str | None = None
    options: Mapping = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data["losses"] = [list(item) for item in self.losses]
        data["tool_version"] = __version__
        return data


def _init_sample(examples: Sequence[TokenizedExample], n: int, seed: int) -> list[TokenizedExample]:
    """A seeded sample of ``n`` examples for the task statistics (all of them when fewer)."""
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(list(examples), n)


def _check_safety_covers(safety: SafetyModule, names: Sequence[str], source: str) -> None:
    if safety.side != "output":
        raise SafetyModuleError(f"{source}: an {safety.side}-side safety module; SaLoRA training needs an "
                                "output-side one (salora-merge calibrate --side output)")
    missing = [n for n in names if n not in safety.bases]
    if missing:
        raise SafetyModuleError(f"{source} has no safety basis for {missing[0]}; recalibrate with --targets "
                                f"including {missing[0].rsplit('.', 1)[-1]}")


@torch.no_grad()
def _task_bases(model, linear: Mapping[str, torch.nn.Module], names: Sequence[str],
                examples: Sequence[TokenizedExample], rank: int, pad: int, batch_size: int,
                progress: Progress) -> tuple[dict[str, torch.Tensor], int]:
    """``U_t`` per module: top ``rank`` left singular vectors of ``W X_t`` on response tokens (unmodified model)."""
    sequences = [(e.input_ids, e.response_mask) for e in examples]
    groups, accumulator, output_sites = accumulate_moments(
        model, {n: linear[n] for n in names}, sequences, ("response",), batch_size, pad, torch.float64,
        progress, allow_output_moments=True)
    site_of = {member: site for site, members in groups.items() for member in members}
    weights = {n: weight_matrix(linear[n]).detach().to("cpu", torch.float64) for n in names}
    moments = {n: accumulator.sums[(site_of[n], "response")].to("cpu") for n in names}
    bases, _ = compute_safety_bases(weights, moments, rank, "output",
                                    frozenset(n for n in names if site_of[n] in output_sites))
    tokens = accumulator.counts[(next(iter(groups)), "response")]
    return bases, tokens


def prepare_model(
    base: ResolvedModel,
    safety: SafetyModule,
    examples: Sequence[TokenizedExample],
    options: TrainOptions,
    resume_state: Mapping[str, torch.Tensor] | None = None,
    progress: Progress = silent,
    safety_label: str = "safety module",
    model: torch.nn.Module | None = None,
    tokenizer=None,
) -> PreparedModel:
    """Load the base (or take ``model``/``tokenizer`` already loaded from it and unmodified), collect the
    task statistics on the unmodified model, initialize and inject the layers. The model's target
    weights are rewritten in place.

    With ``resume_state`` (a checkpoint's tensors) the initial parts ``A0``, ``B0`` are read from it
    instead of recomputed, so ``W_res`` is rebuilt exactly as it was.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base.folder)
    model = model if model is not None else load_causal_lm(base.folder, pick_device(options.device))
    linear = linear_modules(model)
    names = select_targets(list(linear), options.targets)
    for name in names:
        if not isinstance(linear[name], torch.nn.Linear):
            raise InputError(f"--targets: {name} is a {type(linear[name]).__name__}; only nn.Linear layers can be trained")
        d_out, d_in = weight_matrix(linear[name]).shape
        if options.rank > min(d_out, d_in):
            raise InputError(f"--rank {options.rank} exceeds the dimensions of {name} ({d_out} x {d_in})")
        if options.init == "salora" and options.task_rank > d_out:
            raise InputError(f"--task-rank {options.task_rank} exceeds d_out {d_out} of {name}")
    _check_safety_covers(safety, names, safety_label)
    shared = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(param.data_ptr(), []).append(pname)
    for name in names:
        others = [o for o in shared.get(linear[name].weight.data_ptr(), []) if o != f"{name}.weight"]
        if others:
            raise InputError(f"--targets: {name}.weight is shared with {others[0]} (tied weights); SaLoRA "
                             "rewrites the weight as W_res, so leave this module out")

    t0 = time.perf_counter()
    task_tokens = 0
    task_bases: dict[str, torch.Tensor] = {}
    if resume_state is None and options.init == "salora":
        sample = _init_sample(examples, options.init_samples, options.fit.seed)
        task_bases, task_tokens = _task_bases(model, linear, names, sample, options.task_rank,
                                              tokenizer.pad_token_id, options.fit.batch_size, progress)
    generator = torch.Generator().manual_seed(options.fit.seed)
    inits: dict[str, LayerInit] = {}
    s = options.scaling
    for name in names:
        weight = weight_matrix(linear[name]).detach()
        d_out, d_in = weight.shape
        basis = safety.bases[name]
        if basis.shape[0] != d_out:
            raise SafetyModuleError(f"{safety_label}: basis for {name} has {basis.shape[0]} rows, the layer "
                                    f"has d_out {d_out}")
        if resume_state is not None:
            a0, b0 = resume_state[f"{name}.lora_A0"], resume_state[f"{name}.lora_B0"]
            a, b = resume_state[f"{name}.lora_A"], resume_state[f"{name}.lora_B"]
            if a0.shape[0] == 0:
                a0 = b0 = None
        elif options.init == "gaussian":
            a, b = gaussian_init(d_out, d_in, options.rank, generator)
            a0 = b0 = None
        else:
            a0, b0 = (salora_init(weight, options.rank, task_bases[name]) if options.init == "salora"
                      else pissa_init(weight, options.rank))
            # Rounded to float32 before W_res is formed: checkpoints store these float32 values, so a resumed
            # run rebuilds exactly the same W_res.
            a0, b0 = a0.to(torch.float32), b0.to(torch.float32)
            a, b = a0, b0
        if a0 is not None:
            # W_res = W - s C B0 A0 (float64, rounded once to the weight's dtype), written into W's own storage:
            # no second copy of the weight, and a memory-mapped checkpoint's pages are copied on write only.
            with torch.no_grad():
                weight.copy_(residual_weight(weight, a0, b0, basis, s))
        inits[name] = LayerInit(a=a, b=b, a0=a0, b0=b0, safety_basis=basis, scaling=s)
    layers = inject(model, inits, options.dropout)
    model.config.use_cache = False
    return PreparedModel(model=model, tokenizer=tokenizer, layers=layers, seconds_init=time.perf_counter() - t0, task_tokens=task_tokens,
                         linear_names=list(linear))


def export_modules(layers: Mapping[str, SaLoRALinear]) -> dict[str, LoraModule]:
    """The plain LoRA modules (rank ``2r``, or ``r`` for gaussian) equal to the trained layers on the base."""
    out = {}
    for name, layer in layers.items():
        a0 = layer.lora_A0 if layer.has_initial_part else None
        b0 = layer.lora_B0 if layer.has_initial_part else None
        lora_a, lora_b = export_factors(layer.lora_A, layer.lora_B, a0, b0, layer.safety_basis)
        out[name] = LoraModule(name=name, lora_A=lora_a.cpu(), lora_B=lora_b.cpu(), scaling=layer.scaling)
    return out


def _target_modules(names: Sequence[str], all_linear: Sequence[str]) -> list[str]:
    """Suffixes when they select exactly ``names`` among the model's linear layers, else the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in all_linear if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == set(names) else sorted(names)


def adapter_config(options: TrainOptions, base_id: str, target_modules: list[str], doubled: bool) -> dict:
    """A stock PEFT ``adapter_config.json`` for the exported adapter; the scaling equals training's."""
    factor = 2 if doubled else 1
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_id,
        "r": options.rank * factor,
        "lora_alpha": export_alpha(options.alpha, options.use_rslora, factor),
        "use_rslora": options.use_rslora,
        "target_modules": target_modules,
        "lora_dropout": options.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def _run_key(base_fingerprint: str, safety_path: Path, data_digest: str, options: TrainOptions) -> dict:
    return {"base_fingerprint": base_fingerprint, "safety_sha256": file_sha256(safety_path),
            "data_sha256": data_digest, "options": options.run_key(), "tool_version": __version__}


def _resume_point(folder: Path, key: dict, resume: bool, overwrite: bool) -> Path | None:
    """Check the checkpoint folder against this run (no side effects); the checkpoint to resume from, if any."""
    run_file = folder / RUN_NAME
    if resume:
        if not run_file.is_file():
            raise InputError(f"--resume: {folder} holds no training run to resume; drop --resume")
        try:
            stored = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"--resume: {run_file} is not valid JSON ({exc}); drop --resume and pass --overwrite "
                             "to start over") from None
        for part in ("base_fingerprint", "safety_sha256", "data_sha256", "tool_version"):
            if stored.get(part) != key[part]:
                raise InputError(f"--resume: the run in {folder} used another {part.replace('_', ' ')}; "
                                 "resume with the same inputs, or drop --resume to start over")
        changed = [k for k, v in key["options"].items() if stored["options"].get(k) != v]
        if changed:
            raise InputError(f"--resume: option {changed[0]} differs from the run in {folder} "
                             f"({stored['options'].get(changed[0])!r}); resume with the same options")
        found = last_checkpoint(folder)
        if found is None:
            raise InputError(f"--resume: {folder} holds no checkpoint yet (the run stopped before its first "
                             "save); drop --resume to start over")
        return found
    if folder.exists() and not overwrite and last_checkpoint(folder) is not None:
        raise InputError(f"{folder}: checkpoints of an earlier run exist; pass --resume to continue it, "
                         "or --overwrite to start over")
    return None


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun / accelerate launch: only rank 0 writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def _start_checkpoints(folder: Path, key: dict) -> None:
    """A fresh checkpoint folder holding the run's key (replacing one without checkpoints, or with --overwrite)."""
    if not is_main_process():
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / RUN_NAME).write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class RunControl:
    """Where a training run writes and how it treats what is already there (shared by train and retrain)."""

    out: Path
    checkpoint_dir: Path | None = None  # default: OUT.checkpoints next to the output
    resume: bool = False
    keep_checkpoints: bool = False
    overwrite: bool = False
    merge_to: Path | None = None

    @property
    def checkpoints(self) -> Path:
        out = Path(self.out)
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.parent / f"{out.name}.checkpoints"

    def check_outputs_free(self) -> None:
        check_output_free(Path(self.out), self.overwrite)
        if self.merge_to is not None:
            check_output_free(Path(self.merge_to), self.overwrite)


@dataclass
class TrainedAdapter:
    """A trained SaLoRA adapter exported in memory, before it is written."""

    modules: dict[str, LoraModule]
    config: dict
    report: TrainReport
    safety_meta: dict


def prepare_run(base_ref: str, safety_path: Path, run: RunControl) -> tuple[ResolvedModel, str, SafetyModule]:
    """Resolve the base and load the safety module (checked against it) before any work."""
    run.check_outputs_free()
    base = resolve_model(base_ref)
    fingerprint = open_checkpoint(base.folder).fingerprint()
    safety = load_safety_module(Path(safety_path))
    check_same_base(safety, fingerprint, base.model_id, str(safety_path))
    return base, fingerprint, safety


def train_adapter(
    base: ResolvedModel,
    fingerprint: str,
    safety: SafetyModule,
    safety_path: Path,
    examples: Sequence[TokenizedExample],
    data_label: str,
    data_digest: str,
    options: TrainOptions,
    run: RunControl,
    progress: Progress = silent,
    echo: Callable[[str], None] | None = None,
    callbacks: Sequence[object] = (),
    model: torch.nn.Module | None = None,
    tokenizer=None,
) -> TrainedAdapter:
    """Initialize, train on tokenized ``examples`` (resuming from a checkpoint when asked) and export, in memory.

    ``model``/``tokenizer``: the unmodified base already loaded, to spare a load (its weights are rewritten).
    """
    checkpoint_dir = run.checkpoints
    if options.random_control is not None:
        safety = random_control(safety, options.random_control)
    key = _run_key(fingerprint, Path(safety_path), data_digest, options)
    resume_from = _resume_point(checkpoint_dir, key, run.resume, run.overwrite)
    resume_state = read_state(resume_from) if resume_from is not None else None

    prepared = prepare_model(base, safety, examples, options, resume_state, progress, str(safety_path),
                             model=model, tokenizer=tokenizer)
    device = next(prepared.model.parameters()).device
    fit_options = replace(options.fit, device=device.type)
    if resume_from is None:
        _start_checkpoints(checkpoint_dir, key)
    try:
        result: FitResult = fit(prepared.model, examples, prepared.tokenizer.pad_token_id, fit_options,
                                checkpoint_dir, resume_from=resume_from, callbacks=callbacks, echo=echo)
    except BaseException:
        if last_checkpoint(checkpoint_dir) is None:  # nothing to resume from: leave nothing behind
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        raise

    modules = export_modules(prepared.layers)
    doubled = any(layer.has_initial_part for layer in prepared.layers.values())
    config = adapter_config(options, base.model_id,
                            _target_modules(list(prepared.layers), prepared.linear_names), doubled)
    scores = module_scores({n: (m.lora_A, m.lora_B, m.scaling) for n, m in modules.items()},
                           {n: safety.bases[n] for n in modules})
    report = TrainReport(
        base_model=base.model_id, data=data_label, data_sha256=data_digest, examples=len(examples),
        learned_tokens=sum(sum(e.response_mask) for e in examples), safety=str(safety_path),
        safety_rank=safety.rank, init=options.init, rank=options.rank, alpha=options.alpha,
        use_rslora=options.use_rslora, task_rank=options.task_rank, task_tokens=prepared.task_tokens,
        export_rank=int(config["r"]), export_alpha=float(config["lora_alpha"]), modules=len(modules),
        global_step=result.global_step, train_loss=result.train_loss, losses=result.losses,
        safety_energy=summarize(scores).rho, seconds_init=prepared.seconds_init, seconds_train=result.seconds,
        resumed_from=str(resume_from) if resume_from else None, output=str(run.out),
        merged=str(run.merge_to) if run.merge_to else None, options=options.run_key(),
    )
    return TrainedAdapter(modules=modules, config=config, report=report, safety_meta=dict(safety.metadata))


def write_trained(trained: TrainedAdapter, run: RunControl, base_ref: str, extra: Mapping[str, str] | None = None,
                  card_note: str | None = None, progress: Progress = silent) -> None:
    """Write the adapter folder atomically (PEFT files, the report, the card and any ``extra`` text files);
    then merge it when asked, and drop the checkpoints unless kept."""
    with atomic_output_dir(Path(run.out), overwrite=run.overwrite) as tmp:
        write_adapter(tmp, trained.config, trained.modules, {})
        (tmp / REPORT_NAME).write_text(json.dumps(trained.report.to_json(), indent=2) + "\n")
        (tmp / "README.md").write_text(trained_adapter_card(trained.report, trained.safety_meta, card_note))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    if run.merge_to is not None:
        from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge

        run_merge(base_ref, [AdapterInput(str(run.out), 1.0)], Path(run.merge_to), MergeOptions(),
                  overwrite=run.overwrite, progress=progress)
    if not run.keep_checkpoints:
        shutil.rmtree(run.checkpoints, ignore_errors=True)


def run_train(
    base_ref: str,
    conversations,
    data_label: str,
    data_digest: str,
    safety_path: Path,
    options: TrainOptions,
    run: RunControl,
    progress: Progress = silent,
    echo: Callable[[str], None] | None = None,
    callbacks: Sequence[object] = (),
) -> TrainReport:
    """Train a SaLoRA adapter on ``conversations`` and write the portable PEFT adapter to ``run.out``."""
    options.validate()
    base, fingerprint, safety = prepare_run(base_ref, safety_path, run)
    tokenizer = load_tokenizer(base.folder)
    examples = tokenize_all(tokenizer, conversations, options.max_length, data_label)
    trained = train_adapter(base, fingerprint, safety, safety_path, examples, data_label, data_digest, options, run,
                            progress, echo, callbacks, tokenizer=tokenizer)
    if is_main_process():
        write_trained(trained, run, base_ref, progress=progress)
    return trained.report
