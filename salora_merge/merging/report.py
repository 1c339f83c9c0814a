"""What a merge reports: inputs with their digests, options, output shards, figures (JSON, card, provenance)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from salora_merge.version import __version__
from salora_merge.readable import Readable

__all__ = ["MergeReport"]


@dataclass
class MergeReport(Readable):
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

    def render(self) -> str:
        """What was merged, how, and where the checkpoint is."""
        lines = [f"Merged {len(self.adapters)} adapter(s) into {self.base_model}:"]
        for a in self.adapters:
            lines.append(f"  {a['ref']}  weight {a['weight']:g}, {a['modules']} LoRA modules"
                         + (f", modules_to_save {', '.join(a['modules_to_save'])}" if a["modules_to_save"] else ""))
        if self.realign:
            for r in self.realign:
                lines.append(f"  realigned {r['adapter']}: {r['total_energy_removed']:.4f} of its update energy removed "
                             f"(r_s = {r['rank']}, {r['side']} side)")
        else:
            for a in self.adapters:
                prior = a.get("realigned_before")
                if prior:
                    lines.append(f"  {a['ref']} was realigned before (salora_realign.json): "
                                 f"{prior['total_energy_removed']:.4f} of its update energy removed")
            if not any(a.get("realigned_before") for a in self.adapters):
                lines.append("  not realigned")
        if self.untied:
            lines.append(f"  untied {self.untied[0]} from the input embedding (tie_word_embeddings: false)")
        size = sum(s["size"] for s in self.shards)
        lines += [
            f"{self.changed_tensors} tensors changed; dtype {self.dtype}; {len(self.shards)} shard(s), "
            f"{size / 1e6:.1f} MB in {self.seconds:.1f}s",
            f"Wrote {self.output} (model card README.md, provenance salora_config.yml)",
        ]
        return "\n".join(lines)
