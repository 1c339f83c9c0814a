"""Save and load safety modules as a single safetensors file with JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from salora_merge.core.safety import FORMAT_VERSION, SIDES, SafetyModule
from salora_merge.errors import SafetyModuleError
from salora_merge.io.atomic import atomic_output_file

__all__ = ["save_safety_module", "load_safety_module"]

_META_KEY = "salora_safety"
_SEP = "::"


def save_safety_module(safety: SafetyModule, path: Path, overwrite: bool = False) -> None:
    """Write ``basis::M``, ``eigenvalues::M`` (and ``moment::SITE::STAT``) tensors plus metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for name, basis in safety.bases.items():
        tensors[f"basis{_SEP}{name}"] = basis.to(torch.float32).contiguous()
        tensors[f"eigenvalues{_SEP}{name}"] = safety.eigenvalues[name].to(torch.float64).contiguous()
    for (site, stat), moment in safety.moments.items():
        tensors[f"moment{_SEP}{site}{_SEP}{stat}"] = moment.contiguous()
    header = {
        "format_version": FORMAT_VERSION,
        "side": safety.side,
        "sites": dict(safety.sites),
        "counts": {f"{site}{_SEP}{stat}": n for (site, stat), n in safety.counts.items()},
        **dict(safety.metadata),
    }
    with atomic_output_file(Path(path), overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", _META_KEY: json.dumps(header, sort_keys=True)})


def load_safety_module(path: Path) -> SafetyModule:
    """Load and validate a safety-module file written by ``save_safety_module``."""
    path = Path(path)
    if not path.is_file():
        raise SafetyModuleError(f"{path}: safety module file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = (handle.metadata() or {}).get(_META_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise SafetyModuleError(f"{path}: not a safetensors file ({exc})") from None
    if raw_meta is None:
        raise SafetyModuleError(f"{path}: not a salora-merge safety module (no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(raw_meta)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SafetyModuleError(f"{path}: corrupt safety metadata ({str(exc)[:120]})") from None
    if not isinstance(meta, dict):
        raise SafetyModuleError(f"{path}: corrupt safety metadata (a {type(meta).__name__}, not an object); "
                                "recompute it with salora-merge calibrate")
    counts, sites = meta.get("counts", {}), meta.get("sites", {})
    if not isinstance(counts, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in counts.values()):
        raise SafetyModuleError(f"{path}: corrupt safety metadata ('counts' must map sites to token counts); "
                                "recompute it with salora-merge calibrate")
    if not isinstance(sites, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sites.items()):
        raise SafetyModuleError(f"{path}: corrupt safety metadata ('sites' must map modules to sites); "
                                "recompute it with salora-merge calibrate")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SafetyModuleError(
            f"{path}: safety module format {meta.get('format_version')} is not {FORMAT_VERSION}; recompute it"
        )
    side = meta.pop("side", None)
    if side not in SIDES:
        raise SafetyModuleError(f"{path}: unknown side {side!r}")
    sites = meta.pop("sites", {})
    counts = {tuple(k.split(_SEP, 1)): int(v) for k, v in meta.pop("counts", {}).items()}
    meta.pop("format_version")
    bases, values, moments = {}, {}, {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition(_SEP)
        if kind == "basis":
            bases[rest] = tensor
        elif kind == "eigenvalues":
            values[rest] = tensor
        elif kind == "moment":
            site, _, stat = rest.partition(_SEP)
            moments[(site, stat)] = tensor
        else:
            raise SafetyModuleError(f"{path}: unexpected tensor {key}")
    if not bases:
        raise SafetyModuleError(f"{path}: holds no safety bases")
    for name, basis in bases.items():
        if name not in values:
            raise SafetyModuleError(f"{path}: eigenvalues{_SEP}{name} is missing")
        if basis.dim() != 2 or not torch.isfinite(basis).all():
            raise SafetyModuleError(f"{path}: basis{_SEP}{name} is not a finite 2-D matrix")
        gram = basis.to(torch.float64).T @ basis.to(torch.float64)
        if not torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-4):
            raise SafetyModuleError(f"{path}: basis{_SEP}{name} does not have orthonormal columns; the file is corrupt")
    return SafetyModule(bases=bases, eigenvalues=values, side=side, metadata=meta, sites=sites,
                        moments=moments, counts=counts)
