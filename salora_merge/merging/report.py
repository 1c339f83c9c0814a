"""What a merge reports: inputs with their digests, options, output shards, figures (JSON, card, provenance)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from salora_merge.version import __version__

__all__ = ["MergeReport"]


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
