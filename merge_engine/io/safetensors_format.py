"""The safetensors container format: header parsing with validation, and header building for writes.

Format: 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}},
optional "__metadata__"), then the tensor bytes; data_offsets are relative to the end of the header.
We parse headers ourselves so that a truncated or corrupt file is reported, with its path, before
any tensor data is touched.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from merge_engine.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES
from merge_engine.errors import CheckpointError
from merge_engine.io.raw import tensor_bytes

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to validate and plan without reading its data."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    data_start: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors file's header; raise CheckpointError naming the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (declares {header_len} header bytes, "
                    f"file has {size} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_base = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, entry, data_base, size)
    return infos


def _tensor_info(path: str, name: str, entry, data_base: int, file_size: int) -> TensorInfo:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor '{name}': malformed header entry {entry!r}") from e
    nbytes = math.prod(shape) * dtype.itemsize
    if any(d < 0 for d in shape) or end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor '{name}': header says shape {list(shape)} {entry['dtype']} "
            f"({nbytes} bytes) but its data range holds {end - begin} bytes")
    if begin < 0 or data_base + end > file_size:
        raise CheckpointError(
            f"{path}: tensor '{name}': data range [{begin}, {end}) runs past the end of the file "
            f"(truncated file?)")
    return TensorInfo(name, path, dtype, shape, data_base + begin, nbytes)


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Serialise a header for tensors stored in the given order.

    Returns the bytes to write at the start of the file (length prefix, JSON padded with spaces to
    a multiple of 8 as the reference writer does) and each tensor's absolute data offset.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    relative: dict[str, int] = {}
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        relative[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {name: len(prefix) + off for name, off in relative.items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of these tensors in order (what safetensors.torch.save_file writes, without
    its numpy dependency)."""
    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    prefix, _ = build_header([(name, t.dtype, tuple(t.shape)) for name, t in contiguous.items()], metadata)
    with open(path, "wb") as f:
        f.write(prefix)
        for t in contiguous.values():
            f.write(tensor_bytes(t))
