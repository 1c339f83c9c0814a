"""What every card salora-merge writes shares: YAML front matter, Hub ids, the base model's licence.

Each feature writes its own card text (realignment/report.py, merging/card.py, training/card.py,
methods/*).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

__all__ = ["front_matter", "adapter_front_matter", "is_hub_id", "base_license", "hub_card"]

def is_hub_id(ref: str) -> bool:
    """``org/name`` (what a card's base_model may hold), as opposed to a local path."""
    from salora_merge.hf.hub import is_repo_id

    return is_repo_id(ref) and not Path(ref).exists()


def front_matter(fields: Mapping[str, Any]) -> str:
    """YAML front matter; values are JSON scalars/lists, which YAML reads as the same values."""
    lines = ["---"]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def adapter_front_matter(base_model: str, *tags: str) -> str:
    """The front matter of an adapter folder's card: ``base_model`` (a Hub id only; a local folder is not a
    base model the Hub accepts), PEFT, text generation, and the tags after the Hub's adapter tag."""
    hub_id = base_model if is_hub_id(base_model) else None
    return front_matter({"base_model": hub_id, "library_name": "peft", "pipeline_tag": "text-generation",
                         "tags": ([f"base_model:adapter:{hub_id}"] if hub_id else []) + list(tags)})


def base_license(base) -> str | None:
    """The base model's licence: known for built-in aliases, else from its folder's card front matter."""
    if getattr(base, "license", None):
        return base.license
    card = base.folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # a base card we cannot parse must not stop a merge; the licence is then unknown
        return None
    return value if isinstance(value, str) else None


def hub_card(data: Mapping[str, Any], body: str) -> str:
    """A model card through huggingface_hub's ``ModelCardData`` (validated Hub metadata) and ``ModelCard``."""
    from huggingface_hub import ModelCard, ModelCardData

    return str(ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{body}"))
