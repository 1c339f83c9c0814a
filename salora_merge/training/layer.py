"""The SaLoRA linear layer used while training, and putting it into (and reading it out of) a model.

``SaLoRALinear`` computes ``W_res x + b + s C (B (A x))`` (method.md section 3) with ``W_res``, the bias,
``A0``, ``B0`` and ``C`` frozen; only ``lora_A`` and ``lora_B`` train. ``C`` is never a dense matrix: it is
applied to the factor, ``C B = B - U_s (U_s^T B)``. The LoRA path runs in the factors' dtype (float32,
or the autocast dtype), as PEFT's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LayerInit", "SaLoRALinear", "inject", "salora_layers", "state_tensors", "STATE_KEYS"]

STATE_KEYS = ("lora_A", "lora_B", "lora_A0", "lora_B0")


@dataclass(frozen=True)
class LayerInit:
    """What one layer starts from: trainable ``A``/``B``, the fixed part ``A0``/``B0`` (None for gaussian),
    the safety basis and the scaling. The layer's weight already holds ``W_res``."""

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    a0: torch.Tensor | None
    b0: torch.Tensor | None
    safety_basis: torch.Tensor  # (d_out, r_s)
    scaling: float


class SaLoRALinear(nn.Module):
    """``y = W_res x + b + s C (B (A x))`` with ``C = I - U_s U_s^T`` fixed.

    ``base.weight`` must already hold ``W_res = W - s C B0 A0`` (``prepare_model`` writes it in place, so the
    layer costs no memory beyond the factors). The forward pass has the kernels of a PEFT LoRA layer plus
    the projection of the factor ``s C B`` (two ``d_out x r`` products), so the safety constraint holds
    by construction whatever optimizer or engine updates ``B``.
    """

    def __init__(self, base: nn.Linear, init: LayerInit, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # W_res
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        f32 = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(init.a.to(**f32).clone())
        self.lora_B = nn.Parameter(init.b.to(**f32).clone())
        a0 = init.a0 if init.a0 is not None else torch.zeros(0, self.in_features)
        b0 = init.b0 if init.b0 is not None else torch.zeros(self.out_features, 0)
        self.register_buffer("lora_A0", a0.to(**f32).clone())
        self.register_buffer("lora_B0", b0.to(**f32).clone())
        self.register_buffer("safety_basis", init.safety_basis.to(**f32).contiguous())
        self.scaling = float(init.scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def has_initial_part(self) -> bool:
        return self.lora_A0.shape[0] > 0

    def projected_B(self) -> torch.Tensor:
        """``s C B = s B - s U_s (U_s^T B)``, ``(d_out, r)``, in one fused product after ``U_s^T B``.

        Projecting the factor once per forward gives the same output as projecting every token's
        ``B (A x)``, at a cost ``O(d_out r r_s)`` that does not grow with the tokens.
        """
        u = self.safety_basis
        return torch.addmm(self.lora_B, u, u.T @ self.lora_B, beta=self.scaling, alpha=-self.scaling)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s C (B (A x))`` in float32 (or the autocast dtype)."""
        return F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A), self.projected_B())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        return result + self.lora_delta(x).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, "
                f"r_s={self.safety_basis.shape[1]}, s={self.scaling:g}")


def _linear_view(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` over a Conv1D's own storage (its weight the transposed view, so ``W_res`` written into the
    Conv1D's weight is what it computes with); nothing is copied."""
    d_in, d_out = conv.weight.shape
    linear = nn.Linear(d_in, d_out, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.data.T, requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.data, requires_grad=False)
    return linear


def inject(model: nn.Module, inits: Mapping[str, LayerInit], dropout: float = 0.0) -> dict[str, SaLoRALinear]:
    """Replace each named ``nn.Linear`` by a ``SaLoRALinear``; freeze every other parameter."""
    for param in model.parameters():
        param.requires_grad_(False)
    layers = {}
    for name, init in inits.items():
        base = model.get_submodule(name)
        if type(base).__name__ == "Conv1D":  # GPT-2: y = x W + b with W stored (d_in, d_out)
            base = _linear_view(base)
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
