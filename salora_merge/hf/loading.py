"""Loading models and tokenizers (the transformers loaders, device choice and placement, GGUF)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from salora_merge.errors import InputError
from salora_merge.hf.placement import DEVICE_MAPS, Placement, parse_max_memory

__all__ = ["pick_device", "quiet_transformers", "load_causal_lm", "input_device", "load_tokenizer", "dequantize_gguf",
           "Placement", "DEVICE_MAPS", "parse_max_memory"]


def pick_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_causal_lm(folder: Path, device: torch.device, placement: Placement | None = None) -> nn.Module:
    """Load a causal LM for inference: float32 on CPU, bfloat16 on CUDA when supported; with an active
    ``placement``, spread over the devices and offloaded by accelerate instead of moved to ``device``."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
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

    quiet_transformers()
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

    quiet_transformers()
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
