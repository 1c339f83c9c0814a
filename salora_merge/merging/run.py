"""Merge LoRA adapters into a base checkpoint out of core: shard by shard, tensor by tensor.

The plan (which tensor goes where, in which dtype, with which updates) is made from the safetensors
headers before any weight is read; then every input shard is streamed once in file order, each tensor
gets its adapters' updates in float32 and is cast back, and output shards are written to a byte
budget as the tensors come. Resident memory is the tensors in flight and the adapters, not a shard.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from salora_merge import __version__
from salora_merge.calibration.run import CalibrationOptions
from salora_merge.errors import AdapterError, InputError, ShapeMismatchError
from salora_merge.io.adapter import BASE_LAYER, Adapter, base_tensor_name, check_adapter_fits, read_adapter
from salora_merge.io.atomic import atomic_output_dir, check_output_free
from salora_merge.io.checkpoint import CheckpointIndex, open_checkpoint
from salora_merge.io.stream import DTYPES, ShardReader, ShardWriter, dtype_name, element_size, file_sha256
from salora_merge.core.merge_math import LowRankUpdate, cast_exact, merged_weight, parse_size
from salora_merge.progress import Progress, silent
from salora_merge.realignment.run import RealignReport, obtain_safety, realign_modules
from salora_merge.hf.resolve import ResolvedModel, resolve_adapter, resolve_model

__all__ = ["MergeOptions", "AdapterInput", "MergeReport", "plan_merge", "run_merge", "PROVENANCE_NAME",
           "DTYPE_CHOICES", "COPIED_FILES"]

PROVENANCE_NAME = "salora_config.yml"
DTYPE_CHOICES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Files copied from the base folder as they are (config.json is rewritten).
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)
TOKENIZER_FILES = frozenset(COPIED_FILES) - {"generation_config.json", "preprocessor_config.json"}


@dataclass(frozen=True)
class AdapterInput:
    ref: str
    weight: float = 1.0


@dataclass(frozen=True)
class MergeOptions:
    dtype: str = "auto"  # auto keeps every tensor's stored dtype
    shard_size: str = "5GB"
    realign: bool = False
    copy_tokenizer: bool = True

    def validate(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise InputError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
        parse_size(self.shard_size)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: where it comes from and what is added to or replaces it."""

    name: str
    source: str  # the input tensor it is computed from
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    updates: tuple[tuple[int, str], ...] = ()  # (adapter index, module name) LoRA updates to add
    replacement: tuple[int, str] | None = None  # (adapter index, adapter key) of a modules_to_save tensor

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


@dataclass
class MergeReport:
    base_model: str
    base_ref: str
    base_revision: str | None
    adapters: list[dict]
    realign: list[dict] | None
    safety: dict | None
    options: dict
    output: str
    dtype: str
    shards: list[dict] = field(default_factory=list)
    base_shards: dict = field(default_factory=dict)
    changed_tensors: int = 0
    untied: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "tool_version": __version__}


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
) -> MergePlan:
    """Decide every output tensor and shard from the headers alone; raises on any misfit first."""
    shapes = dict(checkpoint.linear_weight_shapes())
    inp_name, out_name = tied if tied else (None, None)
    if tied and out_name not in checkpoint.files and inp_name in checkpoint.files:
        shapes[out_name[: -len(".weight")]] = checkpoint.shapes[inp_name]  # the output layer reads the shared tensor
    for adapter in adapters:
        check_adapter_fits(adapter, shapes)

    updates: dict[str, list[tuple[int, str]]] = {}
    replacements: dict[str, tuple[int, str]] = {}
    for index, adapter in enumerate(adapters):
        for module in adapter.modules:
            updates.setdefault(f"{module}.weight", []).append((index, module))
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
                                  tuple(updates.get(name, ())), replacements.get(name)))
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
    if not out.updates:
        return cast_exact(tensor, target, out.name)
    updates = []
    for index, module in out.updates:
        lora = adapters[index].modules[module]
        updates.append(LowRankUpdate(lora.lora_A, lora.lora_B, lora.scaling, adapters[index].spec.fan_in_fan_out))
    return cast_exact(merged_weight(tensor, updates), target, out.name)


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


def _write_config(base: Path, out: Path, plan: MergePlan, dtype: torch.dtype | None) -> None:
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


def _write_index(out: Path, plan: MergePlan) -> None:
    if len(plan.shards) == 1:
        return
    weight_map = {name: file for file, names in plan.shards for name in names}
    index = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def adapter_digests(folder: Path) -> dict[str, str]:
    """sha256 of the files that define an adapter."""
    return {p.name: file_sha256(p) for p in sorted(Path(folder).iterdir())
            if p.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")}


def _prior_realign(folder: Path) -> dict | None:
    """The summary of ``salora-merge realign``'s report when the adapter folder is its output."""
    from salora_merge.realignment.run import REPORT_NAME

    try:
        data = json.loads((Path(folder) / REPORT_NAME).read_text())
        return {"total_energy_removed": float(data["total_energy_removed"]), "rank": int(data["rank"]),
                "side": str(data["side"]), "safety": str(data["safety"]),
                "original_adapter": str(data["adapter"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _hub_commit(base: ResolvedModel) -> str | None:
    """The commit of a base downloaded from the Hub (its snapshot folder is named after it)."""
    folder = Path(base.folder)
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    return None


def _vocab_size(folder: Path) -> int | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return value if isinstance(value, int) else None


def _may_touch_embeddings(checkpoint: CheckpointIndex, adapters: Sequence[Adapter], folder: Path) -> bool:
    """Whether an adapter could change a tied embedding: it adapts or replaces a tensor the checkpoint
    does not store (a tied output layer) or one with a row per vocabulary entry. Only then is the
    architecture built (which imports transformers, the slowest part of a small merge)."""
    vocab = _vocab_size(folder)
    names = [f"{m}.weight" for a in adapters for m in a.modules] + [
        base_tensor_name(k) for a in adapters for k in a.passthrough]
    for name in names:
        shape = checkpoint.shapes.get(name)
        if shape is None or vocab is None or (len(shape) >= 1 and vocab in shape):
            return True
    return False


def run_merge(
    base_ref: str,
    adapters_in: Sequence[AdapterInput],
    out: Path,
    options: MergeOptions = MergeOptions(),
    safety_path: Path | None = None,
    calibration: CalibrationOptions | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress = silent,
    audit: dict | None = None,
) -> MergeReport:
    """Merge (optionally realigned) adapters into the base and write a complete checkpoint folder."""
    from salora_merge.hf.cards import merged_card  # huggingface_hub's card classes are imported only when writing
    from salora_merge.hf.models import tied_embedding_weights
    from salora_merge.merging.provenance import write_provenance

    started = time.perf_counter()
    options.validate()
    out = Path(out)
    check_output_free(out, overwrite)
    if not adapters_in:
        raise InputError("--adapter: give at least one adapter to merge")
    base: ResolvedModel = resolve_model(base_ref)
    checkpoint = open_checkpoint(base.folder)
    folders = [resolve_adapter(a.ref) for a in adapters_in]
    adapters = [read_adapter(f, allow_pickle=allow_pickle) for f in folders]
    tied = tied_embedding_weights(base.folder) if _may_touch_embeddings(checkpoint, adapters, base.folder) else None
    requested = DTYPE_CHOICES[options.dtype]
    plan = plan_merge(checkpoint, adapters, tied, requested, parse_size(options.shard_size))

    realign_reports: list[dict] | None = None
    safety_record = None
    if options.realign:
        targets = tuple(sorted({m for a in adapters for m in a.modules}))
        safety, label = obtain_safety(base, checkpoint, targets, safety_path, calibration, progress=progress)
        realign_reports = []
        for i, (spec, adapter) in enumerate(zip(adapters_in, adapters)):
            modules, reports = realign_modules(adapter.modules, safety, label)
            adapters[i] = replace(adapter, modules=modules)
            report = RealignReport(base_model=base.model_id, adapter=spec.ref, safety=label, side=safety.side,
                                   rank=safety.rank, modules=tuple(reports), output=str(out))
            realign_reports.append(report.to_json())
        safety_record = {"path": label, "sha256": file_sha256(Path(safety_path)) if safety_path else None,
                         "side": safety.side, "rank": safety.rank,
                         "calibration": None if safety_path else asdict(calibration or CalibrationOptions()),
                         **{k: safety.metadata.get(k) for k in ("prompt_set", "prompt_set_sha256", "token_policy",
                                                               "n_prompts", "n_tokens")}}
    # The weighted sum: scale each adapter's updates by its weight (scaling is a plain float per module).
    weighted = [replace(a, modules={n: replace(m, scaling=m.scaling * spec.weight) for n, m in a.modules.items()})
                for spec, a in zip(adapters_in, adapters)]

    report = MergeReport(
        base_model=base.model_id, base_ref=base.ref, base_revision=_hub_commit(base) or base.revision,
        adapters=[{"ref": a.ref, "weight": a.weight, "modules": len(ad.modules),
                   "modules_to_save": sorted(base_tensor_name(k) for k in ad.passthrough),
                   "base_model_name_or_path": ad.config.get("base_model_name_or_path"),
                   "sha256": adapter_digests(f), "realigned_before": _prior_realign(f)}
                  for a, ad, f in zip(adapters_in, adapters, folders)],
        realign=realign_reports, safety=safety_record,
        options=asdict(options), output=str(out),
        dtype=options.dtype if requested is not None else "auto (" + ", ".join(
            sorted({str(DTYPES[t.dtype]).replace("torch.", "") for t in plan.tensors})) + ")",
        changed_tensors=sum(1 for t in plan.tensors if t.updates or t.replacement or t.name in plan.untied),
        untied=list(plan.untied),
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        report.shards, report.base_shards = write_merged_shards(checkpoint, plan, weighted, tmp, progress)
        _write_index(tmp, plan)
        _write_config(base.folder, tmp, plan, requested)
        for name in COPIED_FILES:
            if (base.folder / name).is_file() and (options.copy_tokenizer or name not in TOKENIZER_FILES):
                shutil.copyfile(base.folder / name, tmp / name)
        report.seconds = time.perf_counter() - started
        write_provenance(tmp / PROVENANCE_NAME, report)
        (tmp / "README.md").write_text(merged_card(report, base, audit))
    return report
