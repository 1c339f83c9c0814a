"""Merge LoRA adapters into a base checkpoint out of core: shard by shard, tensor by tensor.

The plan (which tensor goes where, in which dtype, with which updates) is made from the safetensors
headers before any weight is read; then every input shard is streamed once in file order, each tensor
gets its adapters' updates in float32 and is cast back, and output shards are written to a byte
budget as the tensors come. Resident memory is the tensors in flight and the adapters, not a shard.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from salora_merge.calibration.obtain import obtain_safety
from salora_merge.calibration.run import CalibrationOptions
from salora_merge.core.merge_math import parse_size
from salora_merge.errors import InputError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.resolve import resolve_adapter, resolve_model
from salora_merge.io.adapter import Adapter, base_tensor_name, read_adapter
from salora_merge.io.atomic import atomic_output_dir, check_output_free
from salora_merge.io.checkpoint import CheckpointIndex
from salora_merge.io.stream import DTYPES, file_sha256
from salora_merge.merging.plan import (
    plan_merge,
    write_config,
    write_index,
    write_merged_shards,
)
from salora_merge.merging.report import MergeReport
from salora_merge.methods.projection import realign_modules
from salora_merge.progress import Progress, silent
from salora_merge.realignment.report import REPORT_NAME, RealignReport

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


def adapter_digests(folder: Path) -> dict[str, str]:
    """sha256 of the files that define an adapter."""
    return {p.name: file_sha256(p) for p in sorted(Path(folder).iterdir())
            if p.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")}


def _prior_realign(folder: Path) -> dict | None:
    """The summary of ``salora-merge realign``'s report when the adapter folder is its output."""
    try:
        data = json.loads((Path(folder) / REPORT_NAME).read_text())
        return {"total_energy_removed": float(data["total_energy_removed"]), "rank": int(data["rank"]),
                "side": str(data["side"]), "safety": str(data["safety"]),
                "original_adapter": str(data["adapter"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _hub_commit(base: BaseModel) -> str | None:
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
    base: "str | BaseModel",
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
    from salora_merge.merging.card import (
        merged_card,  # huggingface_hub's card classes are imported only when writing
    )
    from salora_merge.merging.provenance import write_provenance

    started = time.perf_counter()
    options.validate()
    out = Path(out)
    check_output_free(out, overwrite)
    if not adapters_in:
        raise InputError("--adapter: give at least one adapter to merge")
    for given in adapters_in:
        if not math.isfinite(given.weight):
            raise InputError(f"--weight {given.weight} for {given.ref}: expected a finite number")
    base = resolve_model(base)
    checkpoint = base.checkpoint
    folders = [resolve_adapter(a.ref) for a in adapters_in]
    adapters = [base.bind(read_adapter(f, allow_pickle=allow_pickle)) for f in folders]
    tied = base.tied_embeddings if _may_touch_embeddings(checkpoint, adapters, base.folder) else None
    requested = DTYPE_CHOICES[options.dtype]
    plan = plan_merge(checkpoint, adapters, tied, requested, parse_size(options.shard_size), base.conversions)

    realign_reports: list[dict] | None = None
    safety_record = None
    if options.realign:
        fused = next((a for a in adapters if a.params), None)
        if fused is not None:
            raise InputError(f"--realign: {fused.path} has LoRA on fused expert parameters "
                             f"({', '.join(sorted(fused.params))[:120]}), which cannot be realigned yet; merge "
                             "without --realign")
        targets = tuple(sorted({m for a in adapters for m in a.modules}))
        safety, label = obtain_safety(base, targets, safety_path, calibration, progress=progress)
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
    weighted = [replace(a, modules={n: replace(m, scaling=m.scaling * spec.weight) for n, m in a.modules.items()},
                        params={n: replace(p, scaling=p.scaling * spec.weight) for n, p in a.params.items()})
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
        changed_tensors=sum(1 for t in plan.tensors
                            if t.updates or t.slices or t.replacement or t.name in plan.untied),
        untied=list(plan.untied),
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        report.shards, report.base_shards = write_merged_shards(checkpoint, plan, weighted, tmp, progress)
        write_index(tmp, plan)
        write_config(base.folder, tmp, plan, requested)
        for name in COPIED_FILES:
            if (base.folder / name).is_file() and (options.copy_tokenizer or name not in TOKENIZER_FILES):
                shutil.copyfile(base.folder / name, tmp / name)
        report.seconds = time.perf_counter() - started
        write_provenance(tmp / PROVENANCE_NAME, report)
        (tmp / "README.md").write_text(merged_card(report, base, audit))
    return report
