"""The merge plan (every output tensor and shard, decided from the safetensors headers before any weight
is read) and the streaming writer that carries it out, one input shard at a time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from salora_merge.hf.expert_layout import stored_name, stored_slices
from salora_merge.core.merge_math import ExpertUpdate, LowRankUpdate, cast_exact, compute_dtype, merged_weight
from salora_merge.errors import AdapterError, InputError, ShapeMismatchError
from salora_merge.io.adapter import (
    BASE_LAYER,
    Adapter,
    base_tensor_name,
    check_adapter_fits,
)
from salora_merge.io.checkpoint import CheckpointIndex
from salora_merge.io.stream import (
    DTYPES,
    ShardReader,
    ShardWriter,
    dtype_name,
    element_size,
)
from salora_merge.progress import Progress, silent

__all__ = ["OutTensor", "MergePlan", "plan_merge", "write_merged_shards", "write_config", "write_index"]


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: where it comes from and what is added to or replaces it."""

    name: str
    source: str  # the input tensor it is computed from
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    updates: tuple[tuple[int, str], ...] = ()  # (adapter index, module name) LoRA updates to add
    replacement: tuple[int, str] | None = None  # (adapter index, adapter key) of a modules_to_save tensor
    # (adapter index, fused parameter, expert, row start, row stop): a stored per-expert tensor's share of a LoRA
    # on a fused expert parameter (target_parameters)
    slices: tuple[tuple[int, str, int, int, int], ...] = ()

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * element_size(self.dtype)


@dataclass(frozen=True)
class MergePlan:
    tensors: tuple[OutTensor, ...]  # in output order (input shards, file order; untied copies after their source)
    shards: tuple[tuple[str, tuple[str, ...]], ...]  # output file -> tensor names
    untied: tuple[str, ...]  # output-embedding weight written separately because an adapter changed the pair
    tied_names: tuple[str, str] | None

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _output_dtype(stored: str, requested: torch.dtype | None) -> str:
    dtype = DTYPES[stored]
    if requested is None or not dtype.is_floating_point:
        return stored
    return dtype_name(requested)


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_merge(
    checkpoint: CheckpointIndex,
    adapters: Sequence[Adapter],
    tied: tuple[str, str] | None,
    dtype: torch.dtype | None,
    shard_size: int,
    conversions: Sequence = (),
) -> MergePlan:
    """Decide every output tensor and shard from the headers alone; raises on any misfit first.

    ``conversions``: the model's checkpoint conversion mapping, for LoRA on fused expert parameters stored per
    expert."""
    shapes = dict(checkpoint.linear_weight_shapes())
    inp_name, out_name = tied if tied else (None, None)
    if tied and out_name not in checkpoint.files and inp_name in checkpoint.files:
        shapes[out_name[: -len(".weight")]] = checkpoint.shapes[inp_name]  # the output layer reads the shared tensor
    for adapter in adapters:
        check_adapter_fits(adapter, shapes, parameters=True)

    updates: dict[str, list[tuple[int, str]]] = {}
    slices: dict[str, list[tuple[int, str, int, int, int]]] = {}
    replacements: dict[str, tuple[int, str]] = {}
    for index, adapter in enumerate(adapters):
        for module in adapter.modules:
            updates.setdefault(f"{module}.weight", []).append((index, module))
        for name, param in adapter.params.items():  # LoRA on raw parameters
            tensor_name = stored_name(name, conversions, checkpoint.shapes) or name
            stored = checkpoint.shapes.get(tensor_name)
            if stored is None and param.layout.experts > 1 and not param.layout.transposed:
                # stored per expert (transformers fuses them at load): each expert's rows go to their tensor
                d_out, d_in = param.layout.d_out_in
                for cut in stored_slices(name, param.layout.experts, d_out, d_in, conversions, checkpoint.shapes):
                    slices.setdefault(cut.tensor, []).append((index, name, cut.expert, cut.start, cut.stop))
                continue
            if stored is None or tuple(stored) != param.layout.shape:
                raise ShapeMismatchError(
                    f"{adapter.path}: target_parameters {name} has shape {param.layout.shape} in the model's "
                    f"architecture but {'no tensor' if stored is None else tuple(stored)} in its checkpoint")
            updates.setdefault(tensor_name, []).append((index, name))
        for key, tensor in adapter.passthrough.items():
            name = base_tensor_name(key)
            source = inp_name if tied and name == out_name and out_name not in checkpoint.files else name
            stored = checkpoint.shapes.get(source)
            if stored is None:
                raise AdapterError(
                    f"{adapter.path}: modules_to_save tensor {key} replaces {name}, which the base model does not have"
                )
            if tuple(tensor.shape) != tuple(stored):
                raise ShapeMismatchError(
                    f"{adapter.path}: saved tensor {key} has shape {tuple(tensor.shape)} but the base "
                    f"tensor {name} has {tuple(stored)} (added vocabulary rows?); resize the base model's "
                    "embeddings and save it first, then merge into that"
                )
            if key.endswith(BASE_LAYER) and torch.equal(tensor, checkpoint.read(source).to(tensor.dtype)):
                continue  # PEFT's copy of the unchanged base weight: nothing to replace
            if name in replacements:
                raise AdapterError(
                    f"{adapter.path}: {name} is also replaced by adapter {adapters[replacements[name][0]].path} "
                    "(modules_to_save); merge them separately"
                )
            replacements[name] = (index, key)
    for name in sorted(set(updates) & set(replacements)):
        if adapters[replacements[name][0]].passthrough and replacements[name][1].endswith(BASE_LAYER):
            continue  # a saved base weight with LoRA on top: the updates are added to the saved weight
        raise AdapterError(
            f"{name} is both replaced (modules_to_save of {adapters[replacements[name][0]].path}) and LoRA-adapted "
            "by another adapter; the result would depend on the order, merge them separately"
        )

    untie = bool(tied) and any(n in updates or n in replacements for n in (inp_name, out_name))
    plan: list[OutTensor] = []
    for shard in checkpoint.shard_files():
        for name in checkpoint.in_file_order(shard):
            stored = checkpoint.dtypes[name]
            plan.append(OutTensor(name, name, _output_dtype(stored, dtype), tuple(checkpoint.shapes[name]),
                                  tuple(updates.get(name, ())), replacements.get(name), tuple(slices.get(name, ()))))
            if untie and name == inp_name and out_name not in checkpoint.files:
                plan.append(OutTensor(out_name, name, _output_dtype(stored, dtype), tuple(checkpoint.shapes[name]),
                                      tuple(updates.get(out_name, ())), replacements.get(out_name)))

    groups: list[list[str]] = [[]]
    used = 0
    for tensor in plan:
        if groups[-1] and used + tensor.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(tensor.name)
        used += tensor.nbytes
    files = _shard_names(len(groups))
    return MergePlan(
        tensors=tuple(plan),
        shards=tuple((f, tuple(g)) for f, g in zip(files, groups)),
        untied=(out_name,) if untie else (),
        tied_names=tied,
    )


def _compute(tensor: torch.Tensor, out: OutTensor, adapters: Sequence[Adapter]) -> torch.Tensor:
    """The output tensor from its input tensor: replaced, or with its adapters' updates added, cast back."""
    target = DTYPES[out.dtype]
    if out.replacement is not None:
        index, key = out.replacement
        tensor = adapters[index].passthrough[key]
    if not out.updates and not out.slices:
        return cast_exact(tensor, target, out.name)
    updates = []
    for index, name, expert, start, stop in out.slices:
        a, b = adapters[index].params[name].expert_factors()
        updates.append(LowRankUpdate(a[expert], b[expert][start:stop], adapters[index].params[name].scaling))
    for index, module in out.updates:
        if module in adapters[index].params:  # a LoRA on a raw (3-D expert) parameter
            param = adapters[index].params[module]
            a, b = param.expert_factors()
            updates.append(ExpertUpdate(a, b, param.scaling, param.layout.transposed))
            continue
        lora = adapters[index].modules[module]
        updates.append(LowRankUpdate(lora.lora_A, lora.lora_B, lora.scaling, adapters[index].spec.fan_in_fan_out))
    sources = sorted({str(adapters[i].path) for i, *_ in (*out.updates, *out.slices)})
    limit = torch.finfo(compute_dtype(tensor.dtype)).max
    if any(abs(u.scale) > limit for u in updates):
        raise InputError(f"tensor {out.name}: the update of {', '.join(sources)} is scaled beyond the "
                         f"{str(compute_dtype(tensor.dtype)).replace('torch.', '')} range (check --weight); nothing "
                         "was written")
    merged = merged_weight(tensor, updates)
    if not bool(torch.isfinite(merged).all()) and bool(torch.isfinite(tensor).all()):
        raise InputError(f"tensor {out.name}: adding the update of {', '.join(sources)} makes it NaN or Inf; "
                         "nothing was written (check --weight and the adapter's values)")
    return cast_exact(merged, target, out.name)


def write_merged_shards(
    checkpoint: CheckpointIndex,
    plan: MergePlan,
    adapters: Sequence[Adapter],
    folder: Path,
    progress: Progress = silent,
) -> tuple[list[dict], dict[str, str]]:
    """Stream the base shards through the plan into ``folder``. Returns output shard records and the
    sha256 of every input shard (computed from the bytes as they are read)."""
    by_source: dict[str, list[OutTensor]] = {}
    for tensor in plan.tensors:
        by_source.setdefault(tensor.source, []).append(tensor)
    shard_of = {name: i for i, (_, names) in enumerate(plan.shards) for name in names}
    writers: dict[int, ShardWriter] = {}
    remaining = [len(names) for _, names in plan.shards]
    records: list[dict] = [{} for _ in plan.shards]
    input_hashes: dict[str, str] = {}
    try:
        with progress("merging tensors", len(plan.tensors)) as tick:
            for shard in checkpoint.shard_files():
                with ShardReader(checkpoint.folder / shard) as reader:
                    for info, tensor in reader.stream():
                        for out in by_source.get(info.name, ()):
                            index = shard_of[out.name]
                            if index not in writers:
                                file, names = plan.shards[index]
                                wanted = set(names)
                                entries = [(t.name, t.dtype, t.shape) for t in plan.tensors if t.name in wanted]
                                writers[index] = ShardWriter(folder / file, entries, {"format": "pt"})
                            writers[index].write(out.name, _compute(tensor, out, adapters))
                            tick(1)
                            remaining[index] -= 1
                            if remaining[index] == 0:
                                writers.pop(index).close()
                                file = plan.shards[index][0]
                                records[index] = {"file": file, "size": (folder / file).stat().st_size}
                input_hashes[shard] = reader.sha256
    finally:
        for writer in writers.values():
            writer.abort()
    return records, input_hashes


def write_config(base: Path, out: Path, plan: MergePlan, dtype: torch.dtype | None) -> None:
    path = base / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the base model's config ({exc})") from None
    if plan.untied:
        config["tie_word_embeddings"] = False
        text = config.get("text_config")
        if isinstance(text, dict) and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = False
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
        if "dtype" not in config and "torch_dtype" not in config:
            config["dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_index(out: Path, plan: MergePlan) -> None:
    if len(plan.shards) == 1:
        return
    weight_map = {name: file for file, names in plan.shards for name in names}
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


