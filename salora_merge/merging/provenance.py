"""``salora_config.yml``: how a merged model was made, enough to redo the run and to check its inputs."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from salora_merge.version import __version__

if TYPE_CHECKING:
    from salora_merge.merging.report import MergeReport

__all__ = ["provenance_record", "write_provenance", "redo_command"]

FORMAT_VERSION = 1


def redo_command(report: "MergeReport") -> str:
    """The ``salora-merge merge`` command line that makes the same output from the same inputs."""
    base = report.base_ref
    if report.base_revision and "@" not in base and "/" in base and not Path(base).exists():
        base = f"{base}@{report.base_revision}"  # a Hub base: pin the commit that was merged
    parts = ["salora-merge", "merge", "--base", base]
    for adapter in report.adapters:
        parts += ["--adapter", adapter["ref"], "--weight", repr(float(adapter["weight"]))]
    options = report.options
    if options.get("realign"):
        parts.append("--realign")
        if report.safety and report.safety.get("sha256"):
            parts += ["--safety", report.safety["path"]]
    else:
        parts.append("--no-realign")
    parts += ["--dtype", options["dtype"], "--shard-size", str(options["shard_size"])]
    if not options.get("copy_tokenizer", True):
        parts.append("--no-copy-tokenizer")
    parts += ["-o", report.output]
    return shlex.join(parts)


def provenance_record(report: "MergeReport") -> dict:
    base = {"ref": report.base_ref, "model_id": report.base_model, "revision": report.base_revision,
            "shards_sha256": dict(sorted(report.base_shards.items()))}
    adapters = [{"ref": a["ref"], "weight": float(a["weight"]), "files_sha256": a["sha256"],
                 "modules": a["modules"], "modules_to_save": a["modules_to_save"],
                 "realigned_before": a.get("realigned_before")} for a in report.adapters]
    realign = None
    if report.options.get("realign"):
        realign = {
            "safety": report.safety,
            "energy_removed": {r["adapter"]: round(float(r["total_energy_removed"]), 6) for r in report.realign or []},
        }
    return {
        "salora_merge": {"version": __version__, "format_version": FORMAT_VERSION, "command": "merge"},
        "redo": redo_command(report),
        "base": base,
        "adapters": adapters,
        "merge_method": "weighted sum of LoRA updates: W' = W + sum_i weight_i * scaling_i * B_i A_i "
                        "(float32 accumulation, one cast to the output dtype)",
        "realign": realign,
        "options": dict(report.options),
        "output": {"dtype": report.dtype, "shards": report.shards, "untied": report.untied,
                   "changed_tensors": report.changed_tensors},
    }


def write_provenance(path: Path, report: "MergeReport") -> None:
    text = yaml.safe_dump(provenance_record(report), sort_keys=False, allow_unicode=True, width=100)
    Path(path).write_text("# Written by salora-merge; enough to redo this merge and verify its inputs.\n" + text)
