"""LoRA updates applied to a model by forward hooks, as unmerged PEFT computes them (weights untouched)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["lora_applied"]


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
