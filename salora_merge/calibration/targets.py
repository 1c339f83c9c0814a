"""Which layers a calibration covers: the targets' names (layers, routers, experts), the layers too small for the
rank, and a layer's weight for its basis (read from the checkpoint when accelerate offloaded it)."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from salora_merge.errors import InputError
from salora_merge.hf.base_model import BaseModel

__all__ = ["select_targets", "is_default_targets", "small_layer_ranks", "stored_weight"]


def select_targets(available: Sequence[str], targets: Sequence[str] | None) -> list[str]:
    """Module names matching ``targets`` (exact names or ``.suffix``es); all of ``available`` if None."""
    if is_default_targets(targets):
        return list(available)
    def matches(name: str, target: str) -> bool:  # an expert's matrix also matches its parameter's name
        whole = re.sub(r"\[\d+\]$", "", name)
        return any(n == target or n.endswith(f".{target}") for n in {name, whole})

    chosen = [name for name in available if any(matches(name, t) for t in targets)]
    unmatched = [t for t in targets if not any(matches(n, t) for n in available)]
    if unmatched:
        suffixes = sorted({re.sub(r"\[\d+\]$", "", n).rsplit(".", 1)[-1] for n in available})
        raise InputError(f"--targets {unmatched[0]!r} matches no linear layer of the model; available: {', '.join(suffixes)}")
    return chosen


def stored_weight(base: BaseModel, name: str, module, weight: torch.Tensor) -> torch.Tensor:
    """A layer's ``(d_out, d_in)`` weight in float64 on the CPU; read from the checkpoint when accelerate offloaded
    the layer (its parameters are then on the meta device)."""
    if weight.device.type != "meta":
        return weight.detach().to("cpu", torch.float64)
    key = f"{name}.weight"
    if module is None or key not in base.checkpoint.files:
        raise InputError(f"layer {name}: offloaded, and its weight is not stored as {key} in the checkpoint; "
                         "calibrate it without --device-map or with more --max-memory")
    stored = base.checkpoint.read(key).to(torch.float64)
    return stored.T if type(module).__name__ == "Conv1D" else stored


def is_default_targets(targets: Sequence[str] | None) -> bool:
    return targets is None or list(targets) in (["all-linear"], ["all"])


def small_layer_ranks(shapes: Mapping[str, tuple[int, int]], rank: int, cap: bool,
                      refuse_all: bool = True) -> dict[str, int]:
    """The layers too small for ``rank`` (``min(d_out, d_in) < rank``), each with the rank it gets: its size. With
    ``cap`` False the first one is a one-line error naming it (a layer the user named in --targets); with
    ``refuse_all`` a rank that no layer takes is an error (a user's calibration, not a module made for an
    adapter's own modules, where a router alone is capped)."""
    small = {n: min(shape) for n, shape in shapes.items() if min(shape) < rank}
    if refuse_all and small and len(small) == len(shapes):  # no layer takes the rank: a mistake, not a cap
        largest = max(small.values())
        raise InputError(f"--rank {rank} exceeds every layer it applies to (the largest takes {largest}); lower "
                         f"--rank to {largest} or less")
    if small and not cap:
        name = next(iter(small))
        d_out, d_in = shapes[name]
        raise InputError(f"--rank {rank} exceeds the size of layer {name} ({d_out} x {d_in}); lower --rank to "
                         f"{small[name]} or leave it out of --targets")
    return small
