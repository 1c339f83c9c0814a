"""Where a model goes when it is larger than one device: accelerate's big-model options, parsed and checked.
Pure data; ``hf.loading.load_causal_lm`` applies them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from salora_merge.errors import InputError

__all__ = ["Placement", "DEVICE_MAPS", "parse_max_memory", "placement_problems", "placement_of",
           "offloaded_modules", "check_trainable"]


@dataclass(frozen=True)
class Placement:
    """Where a model too large for one device goes: accelerate's big-model loading (``device_map``, per-device
    ``max_memory``, layers beyond them offloaded to CPU and then to ``offload_folder`` on disk)."""

    device_map: str | None = None  # auto, balanced, balanced_low_0 or sequential; None: the whole model on one device
    max_memory: Mapping[str, str] | None = None  # {"0": "20GiB", "cpu": "30GiB"}
    offload_folder: str | None = None

    @property
    def active(self) -> bool:
        return self.device_map is not None


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_max_memory(text: str | None) -> dict[str, str] | None:
    """``"0=20GiB,cpu=30GiB"`` -> ``{"0": "20GiB", "cpu": "30GiB"}`` (accelerate's ``max_memory``)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not size or not (device == "cpu" or device.isdigit()) or not re.fullmatch(
                r"\d+(\.\d+)?\s*([KMGT]i?B)", size, flags=re.IGNORECASE):
            raise InputError(f"--max-memory {text!r}: expected DEVICE=SIZE pairs such as 0=20GiB,cpu=30GiB")
        out[device] = size
    return out


def placement_problems(device_map: str | None, max_memory: str | None,
                       offload_folder: str | None = None) -> list[str]:
    """What is wrong with the placement options as given (a malformed ``--max-memory`` raises at once)."""
    problems = []
    if device_map is not None and device_map not in DEVICE_MAPS:
        problems.append(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    given = [flag for flag, value in (("--max-memory", max_memory), ("--offload-folder", offload_folder)) if value]
    if given and device_map is None:
        problems.append(f"{' and '.join(given)} place{'s' if len(given) == 1 else ''} a model over devices: give "
                        "--device-map too")
    parse_max_memory(max_memory)
    return problems


def placement_of(device_map: str | None, max_memory: str | None, offload_folder: str | None = None) -> Placement:
    """The checked :class:`Placement` of the options (inactive without ``device_map``); the first problem raises."""
    problems = placement_problems(device_map, max_memory, offload_folder)
    if problems:
        raise InputError(problems[0])
    return Placement(device_map, parse_max_memory(max_memory), offload_folder)


def offloaded_modules(device_map: Mapping[str, "int | str"]) -> list[str]:
    """The modules of accelerate's ``hf_device_map`` whose weights live away from where they run: on disk, or on
    the CPU while other modules run on accelerators (accelerate then copies them in for every forward pass)."""
    accelerators = any(v not in ("cpu", "disk") for v in device_map.values())
    return [name for name, v in device_map.items() if v == "disk" or (v == "cpu" and accelerators)]


def check_trainable(device_map: Mapping[str, "int | str"] | None) -> None:
    """Training needs every layer resident on the device it runs on (the optimizer updates the adapter factors in
    place, and SaLoRA rewrites the target weights as ``W_res``): a map with offloaded modules is refused."""
    if not device_map:
        return
    off = offloaded_modules(device_map)
    if off:
        where = "disk" if device_map[off[0]] == "disk" else "the CPU"
        raise InputError(f"--max-memory leaves {len(off)} module(s) offloaded (first: {off[0] or 'the model'} to "
                         f"{where}), and training needs every layer on the device it runs on: raise --max-memory or "
                         "add GPUs")
