"""Where a model goes when it is larger than one device: accelerate's big-model options, parsed and checked.
Pure data; ``hf.models.load_causal_lm`` applies them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from salora_merge.errors import InputError

__all__ = ["Placement", "DEVICE_MAPS", "parse_max_memory"]


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
