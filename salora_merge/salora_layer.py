"""The SaLoRA linear layer used while training, and putting it into (and reading it out of) a model.

``SaLoRALinear`` computes ``W_res x + b + s C (B (A x))`` (method.md section 3). ``W_res`` and the bias
are frozen; only ``lora_A`` and ``lora_B`` train. ``C`` is applied as ``y - (y U_s) U_s^T`` and is
never a dense matrix. The LoRA path runs in the factors' dtype (float32), as PEFT's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .training_math import project_out

__all__ = ["LayerInit", "SaLoRALinear", "inject", "salora_layers", "state_tensors", "STATE_KEYS"]

STATE_KEYS = ("lora_A", "lora_B", "lora_A0", "lora_B0")


@dataclass(frozen=True)
class LayerInit:
    """What one layer starts from: trainable ``A``/``B``, the fixed part ``A0``/``B0`` (None for
    gaussian), the residual weight, the safety basis and the scaling."""

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    a0: torch.Tensor | None
    b0: torch.Tensor | None
    residual: torch.Tensor  # (d_out, d_in), the base dtype
    safety_basis: torch.Tensor  # (d_out, r_s)
    scaling: float


class SaLoRALinear(nn.Module):
    """``y = W_res x + b + s * C (B (A x))`` with ``C = I - U_s U_s^T`` fixed."""

    def __init__(self, base: nn.Linear, init: LayerInit, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(init.residual.to(device=base.weight.device, dtype=base.weight.dtype),
                                   requires_grad=False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(init.a.to(device=device, dtype=torch.float32).clone())
        self.lora_B = nn.Parameter(init.b.to(device=device, dtype=torch.float32).clone())
        a0 = init.a0 if init.a0 is not None else torch.zeros(0, self.in_features)
        b0 = init.b0 if init.b0 is not None else torch.zeros(self.out_features, 0)
        self.register_buffer("lora_A0", a0.to(device=device, dtype=torch.float32).clone())
        self.register_buffer("lora_B0", b0.to(device=device, dtype=torch.float32).clone())
        self.register_buffer("safety_basis", init.safety_basis.to(device=device, dtype=torch.float32).contiguous())
        self.scaling = float(init.scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def has_initial_part(self) -> bool:
        return self.lora_A0.shape[0] > 0

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s C (B (A x))`` in float32 (or the autocast dtype)."""
        h = self.dropout(x.to(self.lora_A.dtype))
        y = F.linear(F.linear(h, self.lora_A), self.lora_B)
        return self.scaling * project_out(y, self.safety_basis.to(y.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        return result + self.lora_delta(x).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, "
                f"r_s={self.safety_basis.shape[1]}, s={self.scaling:g}")


def inject(model: nn.Module, inits: Mapping[str, LayerInit], dropout: float = 0.0) -> dict[str, SaLoRALinear]:
    """Replace each named ``nn.Linear`` by a ``SaLoRALinear``; freeze every other parameter."""
    for param in model.parameters():
        param.requires_grad_(False)
    layers = {}
    for name, init in inits.items():
        base = model.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not nn.Linear")
        layer = SaLoRALinear(base, init, dropout)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers[name] = layer
    return layers


def salora_layers(model: nn.Module) -> dict[str, SaLoRALinear]:
    """The SaLoRA layers of a model by module name (unwrapping DDP-style ``module.`` prefixes)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SaLoRALinear):
            out[name[len("module."):] if name.startswith("module.") else name] = module
    return out


def state_tensors(layers: Mapping[str, SaLoRALinear]) -> dict[str, torch.Tensor]:
    """What a checkpoint needs to rebuild and continue the layers: ``A, B, A0, B0`` per module (CPU, float32).

    ``W_res`` is not stored: it is recomputed from the base weight, ``A0``, ``B0`` and the safety basis.
    """
    out = {}
    for name, layer in layers.items():
        for key in STATE_KEYS:
            out[f"{name}.{key}"] = getattr(layer, key).detach().to("cpu", torch.float32).contiguous()
    return out
