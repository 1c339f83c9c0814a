"""Stream safetensors files tensor by tensor, with plain reads and writes (no mmap, no whole-file buffers).

A safetensors file is an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
``data_offsets`` relative to the data section, and an optional ``__metadata__`` of strings), then the
tensors' bytes back to back. Reading a tensor here is one ``pread`` into a fresh buffer, so resident
memory holds only the tensors in use, never the mapped file; writing lays out the header first (every
shape and dtype is known before any data is written) and appends each tensor as it is produced. A
streamed read feeds the sha256 of the whole file as its bytes go by (on a helper thread), so the
input checksums cost no extra pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from salora_merge.errors import InputError
from salora_merge.io.hashing import ThreadedSha256

__all__ = ["TensorInfo", "ShardReader", "ShardWriter", "DTYPES", "dtype_name", "element_size", "file_sha256"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def element_size(name: str) -> int:
    return torch.empty((), dtype=DTYPES[name]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class ShardReader:
    """One safetensors file, opened for the life of a ``with`` block; tensors read in any order."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.header_bytes = b""
        self.data_start = 0
        self.sha256: str | None = None
        self._parse()

    def _fail(self, why: str) -> InputError:
        return InputError(f"{self.path}: not a readable safetensors file ({why}); the file is damaged or of "
                          "another format, re-download or re-save it")

    def _parse(self) -> None:
        try:
            size = self.path.stat().st_size
            with self.path.open("rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise self._fail("file is shorter than a safetensors header")
                (length,) = struct.unpack("<Q", prefix)
                if length > min(_MAX_HEADER, size - 8):
                    raise self._fail(f"header length {length} does not fit the file ({size} bytes)")
                raw = handle.read(length)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._fail("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        self.header_bytes = prefix + raw
        self.data_start = 8 + length
        self.metadata = dict(header.pop("__metadata__", None) or {})
        data_size = size - self.data_start
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"header entry for {name} is malformed") from None
            if dtype not in DTYPES:
                raise self._fail(f"tensor {name} has unsupported dtype {dtype}")
            count = 1
            for d in shape:
                count *= d
            if not (0 <= begin <= end <= data_size) or end - begin != count * element_size(dtype):
                raise self._fail(f"tensor {name} has offsets [{begin}, {end}) that do not fit its shape or the file")
            self.tensors[name] = TensorInfo(name, dtype, shape, int(begin), int(end))

    def in_file_order(self) -> list[TensorInfo]:
        return sorted(self.tensors.values(), key=lambda t: t.begin)

    def __enter__(self) -> "ShardReader":
        self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read_bytes(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's raw bytes in a fresh (not zero-filled) uint8 tensor."""
        if self._fd is None:
            raise RuntimeError("ShardReader used outside its with block")
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        while done < info.nbytes:
            got = os.preadv(self._fd, [view[done:]], self.data_start + info.begin + done)
            if got == 0:
                raise self._fail(f"file ends inside tensor {info.name}")
            done += got
        return buffer

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return _tensor_from(self.read_bytes(info), info)

    def stream(self):
        """Yield ``(info, tensor)`` in file order. When the tensors lie back to back, as every
        safetensors writer lays them out, the whole file's sha256 is then in ``self.sha256``."""
        digest = ThreadedSha256(self.header_bytes)
        position = 0
        try:
            for info in self.in_file_order():
                buffer = self.read_bytes(info)
                if info.begin == position:
                    digest.update(memoryview(buffer.numpy()))
                    position = info.end
                else:
                    position = -1
                yield info, _tensor_from(buffer, info)
        except BaseException:
            digest.close()
            raise
        data_size = self.path.stat().st_size - self.data_start
        self.sha256 = digest.hexdigest() if position == data_size else file_sha256(self.path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_from(buffer: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    dtype = DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return buffer.view(dtype).reshape(info.shape)


class ShardWriter:
    """Write one safetensors file whose tensor list is fixed up front; tensors are appended in order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        self._expected: list[TensorInfo] = []
        for name, dtype, shape in entries:
            count = 1
            for d in shape:
                count *= d
            size = count * element_size(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expected.append(TensorInfo(name, dtype, tuple(shape), offset, offset + size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.total_size = offset
        self._handle = self.path.open("wb")
        self._write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _write(self, data) -> None:
        self._handle.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self._expected[self._next]
        if name != info.name or dtype_name(tensor.dtype) != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(
                f"{self.path}: expected {info.name} {info.dtype} {info.shape}, got {name} "
                f"{dtype_name(tensor.dtype)} {tuple(tensor.shape)}"
            )
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._next += 1

    def close(self) -> None:
        """Flush and close. Fails if a planned tensor was not written."""
        if self._next != len(self._expected):
            self.abort()
            raise RuntimeError(f"{self.path}: {len(self._expected) - self._next} planned tensors were not written")
        # No fsync: like transformers' save_pretrained, durability across a power cut is left to the
        # file system; the output folder is moved into place only after every file is complete.
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()
