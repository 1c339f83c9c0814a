"""The only module that imports transformers: loading models and tokenizers, chat templates, generation."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from salora_merge.errors import InputError
from salora_merge.hf.placement import DEVICE_MAPS, Placement, parse_max_memory

__all__ = [
    "pick_device",
    "load_causal_lm",
    "load_tokenizer",
    "Placement",
    "DEVICE_MAPS",
    "parse_max_memory",
    "input_device",
    "dequantize_gguf",
    "chat_prompt_ids",
    "output_layer_name",
    "expert_modules",
    "router_modules",
    "generate_greedy",
    "linear_modules",
    "weight_matrix",
    "tied_embedding_weights",
    "parameter_layouts",
    "load_sequence_classifier",
    "conversation_ids",
    "classify_pairs",
    "lora_applied",
]


def pick_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_causal_lm(folder: Path, device: torch.device, placement: Placement | None = None) -> nn.Module:
    """Load a causal LM for inference: float32 on CPU, bfloat16 on CUDA when supported; with an active
    ``placement``, spread over the devices and offloaded by accelerate instead of moved to ``device``."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    dtype = torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    placed = {}
    if placement is not None and placement.active:
        memory = {int(k) if k.isdigit() else k: v for k, v in (placement.max_memory or {}).items()}
        placed = {"device_map": placement.device_map, "max_memory": memory or None,
                  "offload_folder": placement.offload_folder}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **placed)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}: transformers could not load the model ({str(exc)[:300]})") from None
    return model.eval() if placed else model.to(device).eval()


def input_device(model: nn.Module) -> torch.device:
    """The device the model's inputs go to: the input embedding's execution device (under a device map, the
    first non-disk device accelerate placed it on), else its parameters' device."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        embedding = model.get_input_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        name = names.get(id(embedding), "")
        placed = [v for k, v in device_map.items() if name == k or name.startswith(f"{k}.") or k == ""]
        where = placed[0] if placed else next(iter(device_map.values()))
        return torch.device("cpu") if where in ("cpu", "disk") else torch.device(
            f"cuda:{where}" if isinstance(where, int) else where)
    return next(model.parameters()).device


def load_tokenizer(folder: Path):
    """Load the tokenizer; set a pad token (the EOS token) when the model has none."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}: transformers could not load the tokenizer ({exc})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dequantize_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF model with transformers and save it as a float32 safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain float32 once dequantized: detach the GGUF quantizer and its record,
    # which would otherwise make save_pretrained refuse the model.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a single-turn user prompt with the chat template and the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end an answer: the generation config's end-of-sequence ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    return sorted(ids - {None})


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of tokenized prompts, batched with left padding; EOS and after dropped."""
    device = input_device(model)
    pad = tokenizer.pad_token_id
    eos = set(stop_token_ids(model, tokenizer))
    outputs: list[list[int]] = []
    for batch in _batches(list(prompts), batch_size):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        for row in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            outputs.append(row[:cut])
        if on_batch:
            on_batch(len(batch))
    return outputs


def greedy_responses(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                     batch_size: int, on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """``generate_greedy``, with the end-of-turn token kept on a response that stopped on it (as in supervised
    fine-tuning data, so that training and statistics see where an answer ends)."""
    eos = tokenizer.eos_token_id
    out = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch=on_batch)
    return [r + [eos] if len(r) < max_new_tokens else r for r in out]


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

    _quiet_transformers()
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

    _quiet_transformers()
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


def load_sequence_classifier(folder: Path):
    """A local sequence-classification model and its tokenizer, for classifier judges."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"--judge classifier:{folder}: transformers could not load it ({exc})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def conversation_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of a user prompt and an assistant response through the chat template (for judges)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(f"User: {prompt}\nAssistant: {response}")["input_ids"])


@torch.no_grad()
def classify_pairs(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int) -> list[int]:
    """Predicted label id for every (prompt, response), batched with padding."""
    out: list[int] = []
    pairs = [conversation_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
    pad = tokenizer.pad_token_id
    for batch in _batches(pairs, batch_size):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):  # right padding: sequence classifiers pool the last real token
            ids[row, : len(p)] = torch.tensor(p)
            mask[row, : len(p)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.extend(int(i) for i in logits.argmax(-1).tolist())
    return out


@contextmanager
def lora_applied(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
    """Run ``model`` with LoRA updates active, as unmerged PEFT does: a forward hook adds
    ``scale * B (A x)`` to each adapted module's output. The weights are never touched, so removing the
    hooks restores the base model exactly, and no dense ``d_out x d_in`` update is ever formed."""
    handles = []

    def make_hook(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float):
        placed: dict = {}  # the factors on the device and in the dtype the layer computes in, made once

        def hook(module, inputs, output):
            # Where the layer ran (its output's device): with accelerate's big-model loading an offloaded
            # layer's weight lives on the meta device between calls, and its input may arrive elsewhere.
            where = (output.device, output.dtype)
            if where not in placed:
                placed[where] = (lora_A.to(device=output.device, dtype=output.dtype),
                                 lora_B.to(device=output.device, dtype=output.dtype))
            a, b = placed[where]
            x = inputs[0].to(device=output.device, dtype=output.dtype)
            return output + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)

        return hook

    try:
        for name, (lora_A, lora_B, scale) in factors.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(make_hook(lora_A, lora_B, float(scale))))
        yield model
    finally:
        for handle in handles:
            handle.remove()
