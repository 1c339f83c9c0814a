"""The arithmetic of merging LoRA updates into base weights. Pure functions over tensors.

Several adapters merge as the exact weighted sum of their updates,
``W' = W + sum_i w_i * s_i * B_i @ A_i``, accumulated in float32 (float64 for a float64 base) and cast
back once. This is what running the adapters side by side with output scales ``w_i`` computes; it
is not PEFT's ``add_weighted_adapter``, whose ``linear`` mode mixes the factors and so adds cross
terms ``B_i A_j``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from salora_merge.errors import InputError

__all__ = ["LowRankUpdate", "ExpertUpdate", "merged_weight", "cast_exact", "compute_dtype", "parse_size"]


def compute_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype updates are accumulated in: float64 for a float64 weight, else float32."""
    return torch.float64 if stored == torch.float64 else torch.float32


@dataclass(frozen=True)
class LowRankUpdate:
    """``scale * B @ A`` of one adapter for one weight (``fan_in_fan_out``: the weight is stored transposed)."""

    lora_A: torch.Tensor  # (r, d_in)
    lora_B: torch.Tensor  # (d_out, r)
    scale: float
    fan_in_fan_out: bool = False

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The update as a dense matrix in the stored layout (for references and tests)."""
        update = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale
        return update.T if self.fan_in_fan_out else update


@dataclass(frozen=True)
class ExpertUpdate:
    """``scale * B_e @ A_e`` for every expert ``e`` of a 3-D parameter (or the one matrix of a 2-D one, E = 1);
    ``transposed``: each expert is stored ``(d_in, d_out)``."""

    lora_A: torch.Tensor  # (E, r, d_in)
    lora_B: torch.Tensor  # (E, d_out, r)
    scale: float
    transposed: bool = False

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The update in the stored layout, ``(E, d_out, d_in)`` or ``(E, d_in, d_out)`` (references, tests)."""
        update = torch.bmm(self.lora_B.to(dtype), self.lora_A.to(dtype)) * self.scale
        return update.transpose(1, 2) if self.transposed else update


def merged_weight(weight: torch.Tensor, updates: Sequence[LowRankUpdate | ExpertUpdate]) -> torch.Tensor:
    """``W + sum_i scale_i * B_i @ A_i`` in the compute dtype; the caller casts back once.

    Each update is one in-place ``addmm`` on the float32 copy of ``W``: no dense ``d_out x d_in``
    update is materialised, so the work is one conversion pass plus the rank-r products.
    """
    out = weight.to(compute_dtype(weight.dtype), copy=True)
    for update in updates:
        if isinstance(update, ExpertUpdate):
            _add_experts(out, update)
            continue
        a, b = update.lora_A.to(out.dtype), update.lora_B.to(out.dtype)
        if update.fan_in_fan_out:
            a, b = b.T, a.T  # stored (d_in, d_out): W += s * A^T B^T
        if (b.shape[0], a.shape[1]) != tuple(out.shape):
            raise ValueError(f"update of shape {(b.shape[0], a.shape[1])} does not fit weight {tuple(out.shape)}")
        out.addmm_(b, a, alpha=update.scale)
    return out


def _add_experts(out: torch.Tensor, update: ExpertUpdate) -> None:
    """Add each expert's rank-r product in place (one ``addmm`` per expert; nothing dense materialised)."""
    a, b = update.lora_A.to(out.dtype), update.lora_B.to(out.dtype)
    stacks = out if out.dim() == 3 else out.unsqueeze(0)
    if stacks.shape[0] != a.shape[0]:
        raise ValueError(f"update for {a.shape[0]} experts does not fit weight {tuple(out.shape)}")
    for e in range(a.shape[0]):
        lhs, rhs = (a[e].T, b[e].T) if update.transposed else (b[e], a[e])
        if (lhs.shape[0], rhs.shape[1]) != tuple(stacks[e].shape):
            raise ValueError(f"update of shape {(lhs.shape[0], rhs.shape[1])} does not fit expert weight "
                             f"{tuple(stacks[e].shape)}")
        stacks[e].addmm_(lhs, rhs, alpha=update.scale)


def cast_exact(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Cast to ``dtype``; refuse when finite values would become Inf or NaN (out of range)."""
    if tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    if not (out.is_floating_point() and tensor.is_floating_point()) or tensor.numel() == 0:
        return out
    # Fast path (one vectorised reduction): every value within the target's range casts to a finite
    # value. NaN, Inf or an out-of-range value falls through to the exact element-wise check.
    low, high = torch.aminmax(tensor)
    limit = torch.finfo(dtype).max
    if not (float(high) <= limit and float(low) >= -limit):
        bad = torch.isfinite(tensor) & ~torch.isfinite(out)
        if bool(bad.any()):
            peak = float(tensor[bad].abs().max())
            raise InputError(
                f"tensor {name}: value {peak:.4g} overflows {str(dtype).replace('torch.', '')}; "
                "use --dtype bfloat16 or float32, which keep it"
            )
    return out


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, option: str = "--shard-size") -> int:
    """``"5GB"`` -> 5e9 bytes (decimal units, as transformers uses; ``GiB`` for binary ones)."""
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not (0 < value < 1e18):  # also NaN and Inf
        raise InputError(f"{option} {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(value * _UNITS[unit])
