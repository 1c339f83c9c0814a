"""Read a safetensors checkpoint folder lazily, one tensor (and one open shard) at a time."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from salora_merge.errors import InputError
from salora_merge.io.stream import ShardReader

__all__ = ["CheckpointIndex", "open_checkpoint"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointIndex:
    """Where every tensor of a checkpoint lives, with its stored shape and dtype (from the headers)."""

    folder: Path
    files: Mapping[str, str]  # tensor name -> shard file name
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]  # safetensors names: "F32", "BF16", ...
    offsets: Mapping[str, int] = field(default_factory=dict)  # where each tensor starts in its shard

    def in_file_order(self, shard: str) -> list[str]:
        """The tensors of one shard in the order their bytes lie in the file."""
        return sorted((n for n, f in self.files.items() if f == shard), key=lambda n: self.offsets.get(n, 0))

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (its shard is opened for this read only)."""
        if name not in self.files:
            raise InputError(f"{self.folder}: the checkpoint has no tensor {name}")
        with safe_open(str(self.folder / self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def shard_files(self) -> list[str]:
        """Shard file names in the order of the index (model-00001-of-... first)."""
        return sorted(set(self.files.values()))

    def linear_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Module name -> stored shape, for every 2-D ``*.weight`` tensor."""
        return {n[: -len(".weight")]: s for n, s in self.shapes.items() if n.endswith(".weight") and len(s) == 2}

    def fingerprint(self) -> str:
        """A fast sha256 fingerprint of the weights: every tensor's name, shape and dtype, and three
        rows (first, middle, last) of every 2-D tensor. Two different fine-tunes of one architecture
        differ in it; the cost does not grow with model size beyond reading the headers and rows."""
        digest = hashlib.sha256()
        by_file: dict[str, list[str]] = {}
        for name in sorted(self.files):
            by_file.setdefault(self.files[name], []).append(name)
            digest.update(f"{name}|{self.shapes[name]}|{self.dtypes[name]}\n".encode())
        for file in sorted(by_file):
            with safe_open(str(self.folder / file), framework="pt") as handle:
                for name in by_file[file]:
                    shape = self.shapes[name]
                    if len(shape) != 2 or shape[0] == 0:
                        continue
                    sl = handle.get_slice(name)
                    for row in sorted({0, shape[0] // 2, shape[0] - 1}):
                        digest.update(sl[row : row + 1].contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, int]]:
    """Shapes, dtypes and data offsets of one shard, from its header (validated against the file size)."""
    tensors = ShardReader(path).tensors
    return ({n: t.shape for n, t in tensors.items()}, {n: t.dtype for n, t in tensors.items()},
            {n: t.begin for n, t in tensors.items()})


def open_checkpoint(folder: Path) -> CheckpointIndex:
    """Index a transformers checkpoint folder (``model.safetensors`` or a sharded index)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: model folder not found")
    files: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    offsets: dict[str, int] = {}
    index_path = folder / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            raise InputError(f"{index_path}: malformed index ({exc}); re-save the checkpoint") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v and "/" not in v and "\\" not in v
                for k, v in weight_map.items()):
            raise InputError(f"{index_path}: 'weight_map' must map tensor names to shard file names in the folder; "
                             "re-save the checkpoint")
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise InputError(f"{index_path}: lists shard {shard}, which is missing from {folder}")
            s, d, o = _header(shard_path)
            for name in s:
                if weight_map.get(name) != shard:
                    where = f"lists it in {weight_map[name]}" if name in weight_map else "does not list it"
                    raise InputError(
                        f"{index_path}: does not match its shards: {shard} holds tensor {name} but the index "
                        f"{where}; re-save the checkpoint or fix the index"
                    )
                files[name] = shard
            shapes.update(s)
            dtypes.update(d)
            offsets.update(o)
        missing = sorted(set(weight_map) - set(files))
        if missing:
            raise InputError(f"{index_path}: tensor {missing[0]} is listed but not found in shard {weight_map[missing[0]]}")
    elif (folder / SINGLE).is_file():
        shapes, dtypes, offsets = _header(folder / SINGLE)
        files = {name: SINGLE for name in shapes}
    else:
        raise InputError(
            f"{folder}: no {SINGLE} or {INDEX}; salora-merge reads safetensors checkpoints only "
            "(convert pickled .bin weights with transformers' save_pretrained(safe_serialization=True))"
        )
    return CheckpointIndex(folder=folder, files=files, shapes=shapes, dtypes=dtypes, offsets=offsets)
