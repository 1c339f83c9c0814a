"""The SaLoRA linear layer used while training, and putting it into (and reading it out of) a model.

``SaLoRALinear`` computes ``W_res x + b + s C (B (A x))`` (method.md section 3) with ``W``, the bias,
``A0``, ``B0`` and ``C`` frozen; only ``lora_A`` and ``lora_B`` train. Neither ``W_res`` nor ``C`` is ever a
dense matrix: ``W_res x = W x - s C B0 (A0 x)``, and ``C`` is applied to the factor,
``C B = B - U_s (U_s^T B)`` (``d_out x r``, once per forward), which gives the same output as projecting
every token's ``B (A x)`` at a cost that does not grow with the tokens. The LoRA path runs in the
factors' dtype (float32, or the autocast dtype), as PEFT's does.
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
    """What one layer starts from: trainable ``A``/``B``, the fixed part ``A0``/``B0`` (None for gaussian),
    the safety basis and the scaling."""

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    a0: torch.Tensor | None
    b0: torch.Tensor | None
    safety_basis: torch.Tensor  # (d_out, r_s)
    scaling: float


class SaLoRALinear(nn.Module):
    """``y = W_res x + b + s C (B (A x))`` with ``W_res = W - s C B0 A0`` and ``C = I - U_s U_s^T`` fixed.

    ``W_res`` is never materialized: the layer keeps the base ``W`` untouched (no copy, no rounding of a
    residual into the base dtype) and computes ``W x + [s C B, -s C B0] [A ; A0] x``, which is the same
    function and exactly the exported rank-2r adapter's. At initialization (``A = A0``, ``B = B0``) the two
    halves cancel exactly, so the layer returns ``W x + b`` bit for bit.
    """

    def __init__(self, base: nn.Linear, init: LayerInit, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        f32 = dict(device=device, dtype=torch.float32)
        self.lora_A = nn.Parameter(init.a.to(**f32).clone())
        self.lora_B = nn.Parameter(init.b.to(**f32).clone())
        a0 = init.a0 if init.a0 is not None else torch.zeros(0, self.in_features)
        b0 = init.b0 if init.b0 is not None else torch.zeros(self.out_features, 0)
        self.register_buffer("lora_A0", a0.to(**f32).clone())
        self.register_buffer("lora_B0", b0.to(**f32).clone())
        self.register_buffer("safety_basis", init.safety_basis.to(**f32).contiguous())
        self.scaling = float(init.scaling)
        # The fixed half of the update's factor, -s C B0, formed once (d_out x r).
        self.register_buffer("fixed_B", (-self.scaling * project_out(self.lora_B0.T, self.safety_basis).T).contiguous(),
                             persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def has_initial_part(self) -> bool:
        return self.lora_A0.shape[0] > 0

    def projected_B(self) -> torch.Tensor:
        """``s C B = s (B - U_s (U_s^T B))``, ``(d_out, r)``: the projection applied to the factor, once per
        forward, costs ``O(d_out r r_s)`` whatever the number of tokens; ``C (B (A x)) = (C B)(A x)``."""
        return self.scaling * project_out(self.lora_B.T, self.safety_basis).T

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s C (B A - B0 A0) x`` in float32 (or the autocast dtype)."""
        h = x.to(self.lora_A.dtype)
        cb = self.projected_B()
        if not self.has_initial_part:
            return F.linear(F.linear(self.dropout(h), self.lora_A), cb)
        if isinstance(self.dropout, nn.Identity) or not self.training:  # one rank-2r path
            a = torch.cat([self.lora_A, self.lora_A0], dim=0)
            return F.linear(F.linear(h, a), torch.cat([cb, self.fixed_B], dim=1))
        # Dropout acts on the trained path only; the fixed part stands for W_res and sees x itself.
        return F.linear(F.linear(self.dropout(h), self.lora_A), cb) + F.linear(F.linear(h, self.lora_A0), self.fixed_B)

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

    The base weight is never changed, so nothing else is needed to rebuild the layers.
    """
    out = {}
    for name, layer in layers.items():
        for key in STATE_KEYS:
            out[f"{name}.{key}"] = getattr(layer, key).detach().to("cpu", torch.float32).contiguous()
    return out
