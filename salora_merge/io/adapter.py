"""Read and write PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

salora-merge reads and writes this format itself; PEFT is only the oracle in the tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from salora_merge.core.lora_config import LoraSpec, parse_lora_config
from salora_merge.errors import AdapterError, ShapeMismatchError

__all__ = [
    "LoraModule",
    "ParamLayout",
    "ParamLora",
    "Adapter",
    "bind_parameters",
    "expand_params",
    "collapse_params",
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

FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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
class ParamLayout:
    """A parameter PEFT wraps under ``target_parameters``, as the base model declares it."""

    module: str  # e.g. "model.layers.0.mlp.experts"
    param: str  # e.g. "gate_up_proj"
    shape: tuple[int, ...]  # (experts, d_out, d_in), (experts, d_in, d_out) when transposed, or (d_out, d_in)
    transposed: bool = False  # the module's is_transposed: experts stored (d_in, d_out)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}"

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def d_out_in(self) -> tuple[int, int]:
        if len(self.shape) == 2:
            return self.shape[0], self.shape[1]
        return (self.shape[2], self.shape[1]) if self.transposed else (self.shape[1], self.shape[2])


@dataclass(frozen=True)
class ParamLora:
    """A LoRA on a raw parameter (PEFT's ``ParamWrapper``): per expert ``e``, ``dW_e = scaling * B_e @ A_e`` in the
    ``(d_out, d_in)`` layout, with PEFT's packing ``lora_A (r * E, d_in)`` (expert-major rows) and
    ``lora_B (d_out, r * E)`` (rank-major columns)."""

    layout: ParamLayout
    key_path: str  # the module path in the adapter's keys (".base_layer" once per parameter wrapped after it)
    lora_A: torch.Tensor  # (r * E, d_in)
    lora_B: torch.Tensor  # (d_out, r * E)
    scaling: float

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0]) // self.layout.experts

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` per expert: ``(E, r, d_in)`` and ``(E, d_out, r)``."""
        e, r = self.layout.experts, self.rank
        a = self.lora_A.reshape(e, r, self.lora_A.shape[-1])
        b = self.lora_B.reshape(self.lora_B.shape[0], r, e).permute(2, 0, 1)
        return a, b


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as read from disk."""

    path: Path
    config: Mapping[str, Any]  # adapter_config.json as written, kept verbatim for the output
    spec: LoraSpec
    modules: Mapping[str, LoraModule]
    passthrough: Mapping[str, torch.Tensor]  # modules_to_save tensors, by original key
    # LoRA on raw parameters (target_parameters), by parameter name, once bound to the base (bind_parameters)
    params: Mapping[str, ParamLora] = field(default_factory=dict)
    # their factors as read, by key path, until bound: which parameter each is needs the base model's layout
    unbound: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


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
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise AdapterError(f"{pickled}: could not be loaded with weights_only=True ({first}); convert it to "
                               "adapter_model.safetensors with a trusted tool") from None
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
    except RecursionError:
        raise AdapterError(f"{config_path}: nested too deeply to be a PEFT config") from None
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
    unbound: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sorted(factors):
        pair = factors[name]
        for factor in ("A", "B"):
            if factor not in pair:
                raise AdapterError(f"{weights_path}: {lora_key(name, factor)} is missing")
        a, b = pair["A"], pair["B"]
        for factor, tensor in (("A", a), ("B", b)):
            if tensor.dtype not in FACTOR_DTYPES:
                raise AdapterError(
                    f"{weights_path}: {lora_key(name, factor)} is {str(tensor.dtype).replace('torch.', '')}; LoRA "
                    "factors must be float16, bfloat16, float32 or float64 (convert the adapter first)")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{weights_path}: {lora_key(name, 'A')} {tuple(a.shape)} and {lora_key(name, 'B')} "
                f"{tuple(b.shape)} are not a (r, d_in), (d_out, r) pair"
            )
        if not spec.targets(name) and spec.target_parameters:
            for factor, tensor in (("A", a), ("B", b)):
                if not torch.isfinite(tensor).all():
                    raise AdapterError(f"{weights_path}: {lora_key(name, factor)} contains NaN or Inf values")
            unbound[name] = (a, b)  # a LoRA on a raw parameter: bound to it with the base model's layout
            continue
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
    if not modules and not unbound:
        raise AdapterError(f"{weights_path}: no lora_A/lora_B tensors found")
    return Adapter(path=folder, config=raw, spec=spec, modules=modules, passthrough=passthrough, unbound=unbound)


def expand_params(params: Mapping[str, ParamLora]) -> dict[str, LoraModule]:
    """Each expert of each LoRA on a raw parameter as a module of its own (named ``module.param[e]``; a 2-D
    parameter such as a router's ``weight`` is its module), for the per-module math of realign and audit."""
    out: dict[str, LoraModule] = {}
    for param in params.values():
        if param.layout.transposed:
            raise AdapterError(f"{param.name}: experts stored (d_in, d_out) (is_transposed) are not supported here")
        if len(param.layout.shape) == 2:
            out[param.layout.module] = LoraModule(param.layout.module, param.lora_A, param.lora_B, param.scaling)
            continue
        a, b = param.expert_factors()
        for e in range(param.layout.experts):
            name = f"{param.name}[{e}]"
            out[name] = LoraModule(name, a[e], b[e], param.scaling)
    return out


def collapse_params(params: Mapping[str, ParamLora], modules: Mapping[str, LoraModule]) -> dict[str, ParamLora]:
    """The inverse of :func:`expand_params`: the new per-expert factors packed back in PEFT's layout."""
    out: dict[str, ParamLora] = {}
    for name, param in params.items():
        if len(param.layout.shape) == 2:
            module = modules[param.layout.module]
            out[name] = replace(param, lora_A=module.lora_A, lora_B=module.lora_B, scaling=module.scaling)
            continue
        experts = [modules[f"{name}[{e}]"] for e in range(param.layout.experts)]
        if len({m.scaling for m in experts}) != 1 or len({m.rank for m in experts}) != 1:
            raise AdapterError(f"{name}: its experts came back with different ranks or scalings")
        a = torch.cat([m.lora_A for m in experts])  # (E * r, d_in), expert-major
        b = torch.stack([m.lora_B for m in experts], dim=-1)  # (d_out, r, E)
        out[name] = replace(param, lora_A=a, lora_B=b.reshape(b.shape[0], -1), scaling=experts[0].scaling)
    return out


def bind_parameters(adapter: Adapter, layouts: Sequence[ParamLayout]) -> Adapter:
    """Bind the adapter's LoRA on raw parameters to the base model's parameters.

    ``layouts``: every parameter of the base the config's ``target_parameters`` select, in the order PEFT wraps
    them (module by module, each module's parameters in registration order). PEFT nests one wrapper per
    parameter of a module, so the k-th of n wrapped parameters has its factors under the module's path with
    ``.base_layer`` repeated ``n - 1 - k`` times. Raises on a missing, unselected or misshapen factor pair.
    """
    if not adapter.unbound and not adapter.spec.target_parameters:
        return adapter
    where = adapter.path / SAFETENSORS_NAME
    by_module: dict[str, list[ParamLayout]] = {}
    for layout in layouts:
        by_module.setdefault(layout.module, []).append(layout)
    unbound = dict(adapter.unbound)
    params: dict[str, ParamLora] = {}
    for module, wrapped in by_module.items():
        for k, layout in enumerate(wrapped):
            key_path = module + ".base_layer" * (len(wrapped) - 1 - k)
            if key_path not in unbound:
                raise AdapterError(f"{where}: adapter_config.json's target_parameters select {layout.name} but "
                                   f"there is no {lora_key(key_path, 'A')} (PEFT would start it at zero); fix "
                                   "the config or the file")
            a, b = unbound.pop(key_path)
            rank = adapter.spec.rank_for(layout.name)
            d_out, d_in = layout.d_out_in
            expected = ((rank * layout.experts, d_in), (d_out, rank * layout.experts))
            if (tuple(a.shape), tuple(b.shape)) != expected:
                raise ShapeMismatchError(
                    f"{where}: {lora_key(key_path, 'A')} {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                    f"{layout.name} {layout.shape} at rank {rank} ({layout.experts} experts: expected "
                    f"{expected[0]} and {expected[1]}); is this adapter for another model?")
            params[layout.name] = ParamLora(layout, key_path, a, b, adapter.spec.scaling_for(layout.name))
    if unbound:
        name = sorted(unbound)[0]
        raise AdapterError(f"{where}: {lora_key(name, 'A')} is for {name}, which neither target_modules nor "
                           "target_parameters select in this base model (PEFT would ignore it); is this adapter "
                           "for another model?")
    return replace(adapter, params=params, unbound={})


def check_adapter_fits(adapter: Adapter, weight_shapes: Mapping[str, tuple[int, ...]],
                       parameters: bool = False) -> None:
    """Check every adapted module against the base model's stored weight shapes.

    ``weight_shapes`` maps module names (no ``.weight``) to the stored weight shape: ``(d_out, d_in)``,
    or ``(d_in, d_out)`` for ``fan_in_fan_out`` (Conv1D) layers. Raises on the first mismatch. A LoRA on raw
    parameters (``target_parameters``) is refused unless ``parameters`` (merge, which binds and merges them).
    """
    if not parameters and (adapter.unbound or adapter.params or adapter.spec.target_parameters):
        raise AdapterError(
            f"{adapter.path}: a LoRA on fused expert parameters (target_parameters "
            f"{', '.join(adapter.spec.target_parameters)}) can be merged (salora-merge merge) but not yet "
            "realigned, audited or trained; leave the experts out (target_parameters=[]) to use this command")
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
        fits_other_way = (module.lora_A.shape[1], module.lora_B.shape[0]) == (d_out, d_in) != (d_in, d_out)
        if fits_other_way:  # the factors fit the weight read the other way: the flag, not the model, is wrong
            flag = str(adapter.spec.fan_in_fan_out).lower()
            raise ShapeMismatchError(
                f"{adapter.path}/adapter_config.json: fan_in_fan_out is {flag}, but the factors of {name} fit its "
                f"weight {shape} only as {'nn.Linear (d_out, d_in)' if adapter.spec.fan_in_fan_out else 'Conv1D (d_in, d_out)'}; "
                f"set fan_in_fan_out to {str(not adapter.spec.fan_in_fan_out).lower()}"
            )
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
    params: Mapping[str, ParamLora] | None = None,
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into an existing (temporary) folder."""
    tensors: dict[str, torch.Tensor] = {}
    for param in (params or {}).values():
        tensors[lora_key(param.key_path, "A")] = param.lora_A.contiguous()
        tensors[lora_key(param.key_path, "B")] = param.lora_B.contiguous()
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
