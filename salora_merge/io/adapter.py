"""Read and write PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

salora-merge reads and writes this format itself; PEFT is only the oracle in the tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from salora_merge.core.lora_config import LoraSpec, parse_lora_config
from salora_merge.errors import AdapterError, ShapeMismatchError

__all__ = [
    "LoraModule",
    "Adapter",
    "read_adapter",
    "write_adapter",
    "check_adapter_fits",
    "lora_key",
    "base_tensor_name",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
BASE_LAYER = ".base_layer.weight"

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear module: ``dW = scaling * lora_B @ lora_A`` (in the ``(d_out, d_in)`` layout)."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    lora_A: torch.Tensor  # (r, d_in)
    lora_B: torch.Tensor  # (d_out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as read from disk."""

    path: Path
    config: Mapping[str, Any]  # adapter_config.json as written, kept verbatim for the output
    spec: LoraSpec
    modules: Mapping[str, LoraModule]
    passthrough: Mapping[str, torch.Tensor]  # modules_to_save tensors, by original key


def base_tensor_name(key: str) -> str:
    """The base checkpoint tensor a pass-through adapter tensor replaces."""
    local = key[len(PREFIX):]
    return local[: -len(BASE_LAYER)] + ".weight" if local.endswith(BASE_LAYER) else local


def lora_key(module: str, factor: str) -> str:
    """The PEFT state-dict key of ``lora_A``/``lora_B`` of ``module``."""
    return f"{PREFIX}{module}.lora_{factor}.weight"


def _load_tensors(folder: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    st = folder / SAFETENSORS_NAME
    if st.is_file():
        try:
            return load_file(str(st)), st
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{st}: not a readable safetensors file ({exc})") from None
    pickled = folder / PICKLE_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{pickled}: pickled adapter weights are refused (loading pickles can run code); "
                "convert to adapter_model.safetensors, or pass --allow-pickle to load it with "
                "torch.load(weights_only=True)"
            )
        try:
            state = torch.load(str(pickled), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for unsafe or corrupt pickles
            raise AdapterError(f"{pickled}: could not be loaded with weights_only=True ({exc})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{pickled}: expected a dict of tensors")
        return state, pickled
    raise AdapterError(f"{folder}: no {SAFETENSORS_NAME} (or {PICKLE_NAME}) in the adapter folder")


def read_adapter(folder: Path, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA adapter folder, validating it fully (kinds, keys, ranks, finiteness)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing; a PEFT adapter folder needs its adapter_config.json")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    spec = parse_lora_config(raw, str(config_path))
    state, weights_path = _load_tensors(folder, allow_pickle)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    passthrough: dict[str, torch.Tensor] = {}
    for key in state:  # unsupported kinds first, whatever the key order
        if "lora_embedding_" in key:
            raise AdapterError(f"{weights_path}: tensor {key} is an embedding LoRA, which is not supported")
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{weights_path}: tensor {key} belongs to a DoRA adapter, which is not supported")
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{weights_path}: tensor {key} does not start with '{PREFIX}'; not a PEFT adapter")
        local = key[len(PREFIX):]
        match = _LORA_KEY.match(local)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = tensor
        elif ".lora_" in local:
            raise AdapterError(f"{weights_path}: tensor {key} is a LoRA tensor of an unsupported kind")
        elif local.endswith(BASE_LAYER) and spec.targets(local[: -len(BASE_LAYER)]):
            # PEFT saves the base weight of an adapted (output) embedding alongside the LoRA factors
            # ("save_embedding_layers"); it replaces the base tensor on load, as modules_to_save do.
            passthrough[key] = tensor
        elif any(re.match(rf"(^|.*\.){m}($|\..*)", local) for m in spec.modules_to_save):
            passthrough[key] = tensor
        else:
            raise AdapterError(
                f"{weights_path}: unexpected tensor {key}: neither lora_A/lora_B nor listed in modules_to_save"
            )

    modules: dict[str, LoraModule] = {}
    for name in sorted(factors):
        pair = factors[name]
        for factor in ("A", "B"):
            if factor not in pair:
                raise AdapterError(f"{weights_path}: {lora_key(name, factor)} is missing")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{weights_path}: {lora_key(name, 'A')} {tuple(a.shape)} and {lora_key(name, 'B')} "
                f"{tuple(b.shape)} are not a (r, d_in), (d_out, r) pair"
            )
        if not spec.targets(name):
            raise AdapterError(
                f"{weights_path}: {lora_key(name, 'A')} is for module {name}, which adapter_config.json's "
                "target_modules/layers_to_transform do not select (PEFT would ignore it); fix the config"
            )
        expected_rank = spec.rank_for(name)
        if a.shape[0] != expected_rank:
            raise AdapterError(
                f"{weights_path}: {lora_key(name, 'A')} has rank {a.shape[0]} but the config "
                f"(r/rank_pattern) says {expected_rank}"
            )
        for factor, tensor in (("A", a), ("B", b)):
            if not torch.isfinite(tensor).all():
                raise AdapterError(f"{weights_path}: {lora_key(name, factor)} contains NaN or Inf values")
        modules[name] = LoraModule(name=name, lora_A=a, lora_B=b, scaling=spec.scaling_for(name))
    if not modules:
        raise AdapterError(f"{weights_path}: no lora_A/lora_B tensors found")
    return Adapter(path=folder, config=raw, spec=spec, modules=modules, passthrough=passthrough)


def check_adapter_fits(adapter: Adapter, weight_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Check every adapted module against the base model's stored weight shapes.

    ``weight_shapes`` maps module names (no ``.weight``) to the stored weight shape: ``(d_out, d_in)``,
    or ``(d_in, d_out)`` for ``fan_in_fan_out`` (Conv1D) layers. Raises on the first mismatch.
    """
    if adapter.spec.target_modules != "all-linear":
        for name in sorted(weight_shapes):
            if adapter.spec.targets(name) and name not in adapter.modules:
                raise AdapterError(
                    f"{adapter.path}: adapter_config.json selects module {name} but adapter_model has no "
                    f"{lora_key(name, 'A')} (PEFT would load it as zero and only warn); fix the config or the file"
                )
    for name, module in adapter.modules.items():
        if name not in weight_shapes:
            raise ShapeMismatchError(
                f"{adapter.path}: {lora_key(name, 'A')} targets module {name}, which the base model "
                "does not have; is this adapter for another model?"
            )
        shape = tuple(weight_shapes[name])
        d_out, d_in = (shape[1], shape[0]) if adapter.spec.fan_in_fan_out else (shape[0], shape[1])
        if module.lora_A.shape[1] != d_in:
            raise ShapeMismatchError(
                f"{adapter.path}: {lora_key(name, 'A')} has shape {tuple(module.lora_A.shape)} but the base "
                f"weight {name}.weight has shape {shape} (d_in {d_in}); is this adapter for another model?"
            )
        if module.lora_B.shape[0] != d_out:
            raise ShapeMismatchError(
                f"{adapter.path}: {lora_key(name, 'B')} has shape {tuple(module.lora_B.shape)} but the base "
                f"weight {name}.weight has shape {shape} (d_out {d_out}); is this adapter for another model?"
            )


def write_adapter(
    folder: Path,
    config: Mapping[str, Any],
    modules: Mapping[str, LoraModule],
    passthrough: Mapping[str, torch.Tensor],
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into an existing (temporary) folder."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors[lora_key(name, "A")] = module.lora_A.contiguous()
        tensors[lora_key(name, "B")] = module.lora_B.contiguous()
    for key, tensor in passthrough.items():
        tensors[key] = tensor.contiguous()
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"refusing to write {key}: it contains NaN or Inf values")
    save_file(tensors, str(Path(folder) / SAFETENSORS_NAME), metadata={"format": "pt"})
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
