"""Where a fused expert parameter lives in a checkpoint that stores it per expert.

transformers 5 fuses the experts of MoE models at load time (``mlp.experts.gate_up_proj`` of shape
``(E, 2F, H)`` from the stored ``block_sparse_moe.experts.{e}.w1.weight`` and ``w3.weight``, each ``(F, H)``)
and writes them back that way. A LoRA on the fused parameter (PEFT's ``target_parameters``) must therefore be
merged into the stored per-expert tensors: expert ``e``'s update, rows ``start:stop``, goes to one stored
tensor. This module reads the model's own conversion mapping (transformers' ``WeightConverter`` and
``WeightRenaming``) and inverts the two operations MoE checkpoints use (stack the experts along dim 0, then
concatenate the sources along dim 1); anything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from salora_merge.errors import AdapterError

__all__ = ["StoredSlice", "stored_slices", "stored_name"]


def stored_name(param: str, transforms: Sequence, shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The stored tensor that is ``param`` as it is (itself, or renamed by the model's conversion mapping, as
    Mixtral's ``block_sparse_moe`` is loaded as ``mlp``); None when it is not stored whole."""
    return _stored_name(param, [t for t in transforms if type(t).__name__ == "WeightRenaming"], shapes)


@dataclass(frozen=True)
class StoredSlice:
    tensor: str  # the stored (d_rows, d_in) tensor
    expert: int
    start: int  # rows start:stop of the expert's (d_out, d_in) update
    stop: int


def _ops(transform) -> list[tuple[str, int | None]]:
    return [(type(o).__name__, getattr(o, "dim", None)) for o in getattr(transform, "operations", [])]


def stored_slices(param: str, experts: int, d_out: int, d_in: int, transforms: Sequence,
                  shapes: Mapping[str, Sequence[int]]) -> list[StoredSlice]:
    """The stored tensors holding the fused parameter ``param`` (``(experts, d_out, d_in)``): per expert, the
    rows of its update each one takes. ``transforms``: the model's conversion mapping; ``shapes``: the
    checkpoint's tensor shapes. Raises ``AdapterError`` when the layout cannot be inverted."""
    renamings = [t for t in transforms if type(t).__name__ == "WeightRenaming"]
    for transform in transforms:
        if type(transform).__name__ != "WeightConverter":
            continue
        target = next((t for t in transform.target_patterns if param.endswith(t.lstrip("^"))), None)
        if target is None:
            continue
        ops = _ops(transform)
        sources = list(transform.source_patterns)
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]) or (
                len(sources) > 1 and len(ops) == 1):
            raise AdapterError(f"{param}: the checkpoint stores it through conversions {ops}, which salora-merge "
                               "cannot invert to merge a LoRA into; merge into a checkpoint saved fused instead")
        prefix = param[: len(param) - len(target.lstrip("^"))]
        out: list[StoredSlice] = []
        for e in range(experts):
            start = 0
            for source in sources:
                name = _stored_name(prefix + source.lstrip("^").replace("*", str(e)), renamings, shapes)
                if name is None:
                    raise AdapterError(f"{param}: expert {e}'s {source!r} is not in the checkpoint under any "
                                       "name the model's conversion mapping gives")
                rows, cols = shapes[name]
                if cols != d_in:
                    raise AdapterError(f"{param}: stored {name} has {cols} columns, the parameter's d_in is {d_in}")
                out.append(StoredSlice(name, e, start, start + rows))
                start += rows
            if start != d_out:
                raise AdapterError(f"{param}: expert {e}'s stored tensors have {start} rows, the parameter's d_out "
                                   f"is {d_out}")
        return out
    raise AdapterError(f"{param}: not in the checkpoint, and no conversion of the model maps a stored tensor to it")


def _stored_name(name: str, renamings: Sequence, shapes: Mapping[str, Sequence[int]]) -> str | None:
    """``name`` as stored: itself, or with one of the model's renamings undone."""
    if name in shapes:
        return name
    for renaming in renamings:
        for src, dst in zip(renaming.source_patterns, renaming.target_patterns):
            if dst in name and name.replace(dst, src) in shapes:
                return name.replace(dst, src)
    return None
