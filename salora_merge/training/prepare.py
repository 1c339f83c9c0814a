"""Prepare a model for SaLoRA training (task statistics on the unmodified model, initialization, W_res in place) and export the trained layers as a PEFT LoRA."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from salora_merge.calibration.run import accumulate_moments, select_targets
from salora_merge.core.safety import (
    SafetyModule,
    compute_safety_bases,
)
from salora_merge.core.training_math import (
    export_alpha,
    export_factors,
    gaussian_init,
    pissa_init,
    residual_weight,
    salora_init,
)
from salora_merge.errors import InputError, SafetyModuleError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.layers import linear_modules, weight_matrix
from salora_merge.hf.loading import pick_device
from salora_merge.hf.placement import Placement, check_trainable
from salora_merge.io.adapter import LoraModule
from salora_merge.progress import Progress, silent
from salora_merge.training.data import TokenizedExample
from salora_merge.training.layer import LayerInit, SaLoRALinear, inject
from salora_merge.training.options import TrainOptions


@dataclass
class PreparedModel:
    """A model with SaLoRA layers in place, and what export needs."""

    model: torch.nn.Module
    tokenizer: object
    layers: dict[str, SaLoRALinear]
    seconds_init: float
    task_tokens: int
    linear_names: list[str] = field(default_factory=list)  # every linear layer of the base, before injection
    fan_in_fan_out: bool = False  # the targets are GPT-2-style Conv1D layers (weights stored (d_in, d_out))


def load_for_training(base: BaseModel, device: str, placement: Placement | None = None) -> torch.nn.Module:
    """A fresh copy of the base to train on: on ``device``, or spread over the GPUs by accelerate under an active
    ``placement`` (every layer resident: offloaded layers are refused, and so is a spread copy per torchrun
    process)."""
    import salora_merge.parallel as parallel

    if placement is None or not placement.active:
        return base.load_model(pick_device(device))
    if parallel.world_size() > 1:
        raise InputError("--device-map spreads one copy of the model over this process's devices, and under torchrun "
                         "every process trains its own copy: drop --device-map or launch one process")
    model = base.load_model(pick_device(device), placement)
    check_trainable(getattr(model, "hf_device_map", None))
    return model


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
    base: BaseModel,
    safety: SafetyModule | None,
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

    ``safety=None``: no constraint, plain LoRA. Each layer gets an empty basis (``C = I``), so the layer, its
    checkpoints and its export are the same code with nothing projected.
    """
    tokenizer = tokenizer if tokenizer is not None else base.tokenizer
    model = model if model is not None else load_for_training(base, options.device, options.placement())
    linear = linear_modules(model)
    names = select_targets(list(linear), options.targets)
    kinds = {type(linear[n]).__name__ for n in names}
    if len(kinds) > 1:  # PEFT's fan_in_fan_out is one setting per adapter
        raise InputError(f"--targets mixes layer types ({', '.join(sorted(kinds))}); a PEFT adapter stores Conv1D "
                         "and nn.Linear layers differently (fan_in_fan_out), so train them in separate adapters")
    for name in names:
        if not (isinstance(linear[name], torch.nn.Linear) or type(linear[name]).__name__ == "Conv1D"):
            raise InputError(f"--targets: {name} is a {type(linear[name]).__name__}; only nn.Linear and Conv1D "
                             "layers can be trained")
        d_out, d_in = weight_matrix(linear[name]).shape
        if options.rank > min(d_out, d_in):
            raise InputError(f"--rank {options.rank} exceeds the dimensions of {name} ({d_out} x {d_in})")
        if options.init == "salora" and options.task_rank > d_out:
            raise InputError(f"--task-rank {options.task_rank} exceeds d_out {d_out} of {name}")
    if safety is not None:
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
        basis = safety.bases[name] if safety is not None else torch.zeros(d_out, 0, dtype=torch.float64)
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
                         linear_names=list(linear), fan_in_fan_out=kinds == {"Conv1D"})


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


def adapter_config(options: TrainOptions, base_id: str, target_modules: list[str], doubled: bool,
                   fan_in_fan_out: bool = False) -> dict:
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
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
