"""The parts of a PEFT ``adapter_config.json`` that change the math, and PEFT's matching rules.

Pure: no file access. Mirrors peft 0.21 (``check_target_module_exists``, ``get_pattern_key``) so an
adapter means here exactly what it means when PEFT loads it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from salora_merge.errors import AdapterError

__all__ = ["LoraSpec", "parse_lora_config"]

# Fields whose non-default value changes the math in a way salora-merge does not implement.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora=true) are not supported: their magnitude vector rescales "
    "the projected update; convert the adapter to plain LoRA first",
    "lora_bias": "adapters with lora_bias=true are not supported: the bias of lora_B is not re-projected",
}


@dataclass(frozen=True)
class LoraSpec:
    """What a PEFT LoRA config says about which modules are adapted and with what scaling."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    target_parameters: tuple[str, ...] = ()  # LoRA on raw parameters (PEFT's ParamWrapper: fused MoE experts)

    def targets_parameter(self, key: str) -> bool:
        """Whether PEFT wraps the parameter ``key`` (``module.param``) under ``target_parameters``."""
        return any(key == t or key.endswith(f".{t}") for t in self.target_parameters)

    def rank_for(self, module: str) -> int:
        """``r`` of a module after ``rank_pattern``."""
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """``lora_alpha`` of a module after ``alpha_pattern``."""
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module: str) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether PEFT would put a LoRA layer on ``module`` (a name from ``named_modules()``)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif module in self.exclude_modules or any(
                module.endswith(f".{key}") for key in self.exclude_modules
            ):
                return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        if self.target_modules is None:
            return False
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return True  # caller restricts to linear layers other than the output layer
            return re.fullmatch(self.target_modules, module) is not None
        if module in self.target_modules:
            return True
        if not any(module.endswith(f".{key}") for key in self.target_modules):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == ():
            return True
        index = _layer_index(module, self.layers_pattern)
        if index is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in self.layers_to_transform


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _layer_index(module: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _as_tuple(value: Any, name: str, source: str) -> tuple | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)):
        return tuple(sorted(value)) if isinstance(value, set) else tuple(value)
    raise AdapterError(f"{source}: '{name}' must be a list or a string, got {type(value).__name__}")


_MAX_RANK = 1 << 20
_FLOAT32_MAX = 3.4028234663852886e38


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_RANK:
        raise AdapterError(f"{source}: '{name}' must be a positive integer (a LoRA rank), got {value!r}")
    return value


def _finite_number(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > _FLOAT32_MAX:
        raise AdapterError(f"{source}: '{name}' must be a finite number within float32's range, got {value!r}")
    return float(value)


def _compile(pattern: str, name: str, source: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(f"{source}: '{name}' {pattern!r} is not a valid regular expression ({exc})") from None


def _pattern_map(value: Any, name: str, source: str, check) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterError(f"{source}: '{name}' must map module patterns to values, got {type(value).__name__}")
    out = {}
    for key, item in value.items():
        _compile(key, f"{name}[{key!r}]", source)
        out[key] = check(item, key)
    return out


def parse_lora_config(raw: Mapping[str, Any], source: str) -> LoraSpec:
    """Validate a PEFT config dict and return the fields that matter; ``source`` names the file.

    Raises ``AdapterError`` for non-LoRA PEFT types and unsupported LoRA variants.
    """
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{source}: peft_type is {raw.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') "
            "are supported"
        )
    for flag, message in _UNSUPPORTED_FLAGS.items():
        if raw.get(flag):
            raise AdapterError(f"{source}: {message}")
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(
            f"{source}: bias={bias!r} trains the base model's biases, which realign cannot constrain; "
            "retrain with bias='none'"
        )
    target_parameters = raw.get("target_parameters") or ()
    if isinstance(target_parameters, str) or not isinstance(target_parameters, (list, tuple)) or not all(
            isinstance(t, str) for t in target_parameters):
        raise AdapterError(f"{source}: 'target_parameters' must be a list of parameter names")
    r = _positive_int(raw.get("r"), "r", source)
    alpha = _finite_number(raw.get("lora_alpha", 8), "lora_alpha", source)
    layers = raw.get("layers_to_transform")
    if isinstance(layers, list):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise AdapterError(f"{source}: 'layers_to_transform' must be a layer index or a list of them, got "
                               f"{layers[:4]!r}")
        layers = tuple(layers)
    elif layers is not None and (not isinstance(layers, int) or isinstance(layers, bool)):
        raise AdapterError(f"{source}: 'layers_to_transform' must be a layer index or a list of them, got {layers!r}")
    pattern = raw.get("layers_pattern")
    if isinstance(pattern, str):
        pattern = (pattern,)
    elif isinstance(pattern, list) and all(isinstance(x, str) for x in pattern):
        pattern = tuple(pattern)
    elif pattern is not None:
        raise AdapterError(f"{source}: 'layers_pattern' must be a string or a list of strings")
    rank_pattern = _pattern_map(raw.get("rank_pattern"), "rank_pattern", source,
                                lambda v, k: _positive_int(v, f"rank_pattern[{k!r}]", source))
    alpha_pattern = _pattern_map(raw.get("alpha_pattern"), "alpha_pattern", source,
                                 lambda v, k: _finite_number(v, f"alpha_pattern[{k!r}]", source))
    target_modules = _as_tuple(raw.get("target_modules"), "target_modules", source)
    exclude_modules = _as_tuple(raw.get("exclude_modules"), "exclude_modules", source)
    for name, value in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if isinstance(value, str) and value != "all-linear":
            _compile(value, name, source)
        elif isinstance(value, tuple) and not all(isinstance(x, str) for x in value):
            raise AdapterError(f"{source}: '{name}' must be a list of module names or a regular expression")
    to_save = raw.get("modules_to_save") or ()
    if not isinstance(to_save, (list, tuple)) or not all(isinstance(x, str) for x in to_save):
        raise AdapterError(f"{source}: 'modules_to_save' must be a list of module names, got {to_save!r}")
    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(raw.get(flag, False), bool):
            raise AdapterError(f"{source}: '{flag}' must be true or false, got {raw.get(flag)!r}")
    return LoraSpec(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        layers_to_transform=layers,
        layers_pattern=pattern,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        modules_to_save=tuple(to_save),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        target_parameters=tuple(target_parameters),
    )


def with_uniform_rank(raw: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """The config for modules that all have rank ``rank`` and scaling 1 (``uniform_factors``): ``r = rank``,
    ``lora_alpha`` such that the scaling is 1 (``rank``, or ``sqrt(rank)`` with rsLoRA), no rank or alpha
    patterns. Every other field is kept."""
    out = dict(raw)
    out["r"] = int(rank)
    out["lora_alpha"] = math.sqrt(rank) if out.get("use_rslora") else float(rank)
    out["rank_pattern"] = {}
    out["alpha_pattern"] = {}
    return out
