"""A model's layers by kind: linear layers, fused experts, routers, the output layer, weights as (d_out, d_in)
matrices, raw-parameter layouts and tied embeddings (some read from the architecture built on the meta device)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from salora_merge.errors import InputError
from salora_merge.hf.loading import quiet_transformers

__all__ = ["linear_modules", "expert_modules", "router_modules", "output_layer_name", "weight_matrix",
           "parameter_layouts", "tied_embedding_weights"]


def linear_modules(model: nn.Module, include_output: bool = False) -> dict[str, nn.Module]:
    """Every linear layer (``nn.Linear`` or GPT-2 ``Conv1D``), the output embedding only with ``include_output``."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and (include_output or module is not output)
    }


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The fused-experts modules (transformers 5's MoE ``experts``: 3-D ``gate_up_proj`` ``(E, 2F, d)`` and
    ``down_proj`` ``(E, d, F)`` in the ``(d_out, d_in)`` layout, and an ``act_fn``), by module name."""
    out = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if (all(p in params and params[p].dim() == 3 for p in ("gate_up_proj", "down_proj"))
                and hasattr(module, "act_fn") and not getattr(module, "is_transposed", False)):
            out[name] = module
    return out


def router_modules(model: nn.Module) -> dict[str, nn.Module]:
    """MoE routers that are not ``nn.Linear`` but hold a 2-D ``weight`` ``(E, d)`` applied to their input."""
    return {name: module for name, module in model.named_modules()
            if type(module).__name__.endswith("Router") and not isinstance(module, nn.Linear)
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2}


def output_layer_name(model: nn.Module) -> str | None:
    """The module name of the output embedding (``lm_head``), tied or not."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is output), None)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight in ``(d_out, d_in)`` layout (``Conv1D`` stores ``(d_in, d_out)``)."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _meta_model(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise InputError(f"{folder}/config.json: transformers could not build the architecture ({exc})") from None


def parameter_layouts(folder: Path, selects: Callable[[str], bool]) -> tuple[list, list]:
    """The base model's parameters that ``selects`` (PEFT's ``target_parameters`` rule on ``module.param``)
    picks, in the order PEFT wraps them (module by module, each module's own parameters in registration order),
    with their shapes and the module's ``is_transposed``; and the model's checkpoint conversion mapping
    (transformers' transforms from stored tensors to parameters; empty when it has none). The architecture is
    built on the meta device."""
    from salora_merge.io.adapter import ParamLayout

    model = _meta_model(folder)
    out = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if selects(f"{module_name}.{param_name}"):
                out.append(ParamLayout(module_name, param_name, tuple(param.shape),
                                       bool(getattr(module, "is_transposed", False))))
    try:
        from transformers.conversion_mapping import extract_weight_conversions_for_model
        transforms = list(extract_weight_conversions_for_model(model) or [])
    except ImportError:  # a transformers without checkpoint conversions stores parameters as they are
        transforms = []
    return out, transforms


def tied_embedding_weights(folder: Path) -> tuple[str, str] | None:
    """``(input_embedding_weight, output_embedding_weight)`` names when the config ties them, else None.

    The model is built on the meta device from its config (no weights are read), so this costs the
    same for any model size.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}/config.json: transformers could not read it ({exc})") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False) and not getattr(config, "tie_word_embeddings", False):
        return None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise InputError(f"{folder}/config.json: transformers could not build the architecture ({exc})") from None
    names = {id(module): name for name, module in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or id(inp) not in names or id(out) not in names:
        return None
    return f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"
