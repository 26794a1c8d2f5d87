"""Writes safetensors files one tensor at a time.

The `safetensors` library saves a dict of tensors that must all be in memory at once; an
export of a model larger than RAM needs to stream. The format is simple and fixed
(https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then the raw
little-endian bytes in header order. Shapes and dtypes are known before any value is read,
so the header is written first and each tensor's bytes follow as they are assembled.
"""
from __future__ import annotations

import json
import math
import struct

import torch

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """`with StreamingSafetensorsWriter(path, [(name, shape, dtype), ...]) as w: w.write(name, t)`
    in the declared order; a missing or misshaped tensor is an error, never a short file."""

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path, self.entries = path, list(entries)
        header, offset = {}, 0
        for name, shape, dtype in self.entries:
            size = tensor_bytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        self._header = text + b" " * (-len(text) % 8)
        self._next = 0
        self._handle = None

    def __enter__(self) -> "StreamingSafetensorsWriter":
        self._handle = open(self.path, "wb")
        self._handle.write(struct.pack("<Q", len(self._header)))
        self._handle.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self.entries[self._next]
        if name != want_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: expected {want_name} {tuple(shape)} {dtype}, got "
                             f"{name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().cpu().contiguous()
        self._handle.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._handle.close()
        if exc_type is None and self._next != len(self.entries):
            raise ValueError(f"{self.path}: only {self._next} of {len(self.entries)} tensors written")


def read_header(path: str) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def read_rows(path: str, data_start: int, entry: dict, prefix: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of sub-tensor `prefix` (leading indices) of a C-contiguous tensor, read with
    one pread into a fresh buffer: no memory map, so no file page stays resident."""
    dtype, shape = _CODE_DTYPES[entry["dtype"]], entry["shape"]
    item = torch.empty((), dtype=dtype).element_size()
    inner = shape[len(prefix):]
    row = math.prod(inner[1:]) * item
    offset = 0
    for i, index in enumerate(prefix):
        offset += index * math.prod(shape[i + 1:]) * item
    offset += lo * row
    out = torch.empty([hi - lo, *inner[1:]], dtype=dtype)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(data_start + entry["data_offsets"][0] + offset)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        got = handle.readinto(view)
    if got != len(view):
        raise ValueError(f"{path}: short read ({got} of {len(view)} bytes)")
    return out
