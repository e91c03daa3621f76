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
from merge_engine.io.untrusted import is_finite_number, is_int, is_text, open_regular, parse_json

MAX_NESTING = 127  # arrays and objects nested in a header (counting its own object): serde_json's, the library's parser
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces (MAX_HEADER_SIZE)
GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # what a clone without git-lfs holds instead
UNREAD_DTYPES = ("U16", "U32", "U64", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2",
                 "C64")  # valid in the format, not merged


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


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What says a file is still the one whose header was read: the same inode, size and modification time."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def folder_identity(folder: str) -> tuple:
    """The file_identity of every file directly in a folder, by name: what says that a statistics folder (Grams,
    Fisher) read earlier in this process has not been rewritten since (`merge-engine stats --overwrite`)."""
    try:
        return tuple((e.name, file_identity(e.stat())) for e in sorted(os.scandir(folder), key=lambda e: e.name)
                     if e.is_file())
    except OSError:  # missing or unreadable: the loader that follows names the problem
        return ()


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors file's header; raise CheckpointError naming the file."""
    return read_header_and_identity(path)[0]


def read_header_and_identity(path: str) -> tuple[dict[str, TensorInfo], tuple[int, ...]]:
    """read_header, and the file_identity of the file it read (taken from the open file, so a file replaced
    after the header was read is told apart by whoever reads its data)."""
    try:
        with open_regular(path) as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                if prefix + f.read(len(GIT_LFS_POINTER) - 8) == GIT_LFS_POINTER:
                    raise CheckpointError(f"{path}: is a Git LFS pointer, not the weights (the repository was cloned "
                                          "without git-lfs: run `git lfs pull` in it, or download the model)")
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (declares {header_len} header bytes, "
                    f"file has {size} bytes)")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:  # strictly UTF-8, as the format says: json would also take a byte-order mark or UTF-16
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not UTF-8: {e.reason} at byte {e.start})") from None
    header = parse_json(text, f"{path}: corrupt safetensors header", parse_constant=_NotJson,
                        parse_int=_integer_or_minus_zero)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)  # null: none, as the library reads it
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) and is_text(k) and is_text(v) for k, v in metadata.items())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings, "
                              "with no lone surrogate escape)")
    data_base = 8 + header_len
    infos = {name: _tensor_info(path, name, entry, data_base, size) for name, entry in header.items()}
    _check_layout(path, infos, data_base, size)
    return infos, file_identity(st)


class _NotJson:
    """NaN or Infinity, which Python's json takes and the safetensors library refuses (they are not JSON): kept as
    this marker, not a number, so that the refusal names the tensor whose entry holds it."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _first_in(entry, wanted) -> object | None:
    """The first key or value anywhere in a header entry for which wanted(it) holds, or None."""
    pending = [entry]
    while pending:
        value = pending.pop()
        if wanted(value):
            return value
        pending += [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else []
    return None


def _nesting(value) -> int:
    """How many arrays and objects are nested at value's deepest point (0 for a number or a string)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        value, level = pending.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            pending += [(child, level + 1) for child in (value.values() if isinstance(value, dict) else value)]
    return deepest


def _integer_or_minus_zero(text: str) -> int | float:
    """A JSON integer as the safetensors library reads it: -0 is a float to it, so not a size or an offset."""
    return -0.0 if text == "-0" else int(text)


def is_count(value) -> bool:
    """A size or offset the format allows: a non-negative integer that int64 (torch's sizes) holds."""
    return is_int(value) and 0 <= value < 2**63


def _tensor_info(path: str, name: str, entry, data_base: int, file_size: int) -> TensorInfo:
    """One header entry, as the format's rules allow it: a known dtype, a shape of non-negative integers,
    two integer offsets whose range holds exactly the shape's bytes within the file; a name that is text (JSON's
    \\u escapes can name half a surrogate pair, which the safetensors library refuses)."""
    if not is_text(name):
        raise CheckpointError(f"{path}: tensor {name!r}: the name is not text (a lone surrogate escape, "
                              "\\ud800-\\udfff): corrupt header")
    if 1 + _nesting(entry) > MAX_NESTING:
        raise CheckpointError(f"{path}: tensor {name!r}: its header entry is nested deeper than the safetensors "
                              f"library parses ({MAX_NESTING} levels of arrays and objects in all): corrupt header")
    constant = _first_in(entry, lambda v: isinstance(v, _NotJson))
    if constant:
        raise CheckpointError(f"{path}: tensor {name!r}: its header entry holds {constant}, which is not JSON "
                              "(corrupt header)")
    untext = _first_in(entry, lambda v: isinstance(v, str) and not is_text(v))  # in fields the format does not define
    if untext is not None:
        raise CheckpointError(f"{path}: tensor {name!r}: its header entry holds {untext!r}, which is not text "
                              "(a lone surrogate escape): corrupt header")
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and entry["dtype"] in (*SAFETENSORS_DTYPES, *UNREAD_DTYPES) and isinstance(entry.get("shape"), list)
            and all(is_count(d) for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
            and all(is_count(o) for o in entry["data_offsets"])):
        raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry {str(entry)[:200]}")
    if _first_in(entry, lambda v: (is_int(v) or isinstance(v, float)) and not is_finite_number(v)) is not None:
        raise CheckpointError(f"{path}: tensor {name!r}: its header entry holds a number beyond a double's range, "
                              "which the safetensors library refuses (corrupt header)")
    if entry["dtype"] in UNREAD_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {entry['dtype']} (merge_engine reads "
                              f"{', '.join(SAFETENSORS_DTYPES)})")
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
    numel = element_count(shape)
    if numel is None:
        raise CheckpointError(f"{path}: tensor {name!r}: shape {list(shape)} overflows computing its size "
                              "(a product of its sizes passes 2**63)")
    if numel == 0 and not torch_can_lay_out(dtype, shape):
        raise CheckpointError(f"{path}: tensor {name!r}: shape {list(shape)} has no elements, but torch cannot lay it "
                              "out (its strides overflow int64)")
    begin, end = entry["data_offsets"]
    nbytes = numel * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r}: header says shape {list(shape)} {entry['dtype']} "
            f"({nbytes} bytes) but its data range holds {end - begin} bytes")
    if data_base + end > file_size:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data range [{begin}, {end}) runs past the end of the file "
            f"(truncated file?)")
    return TensorInfo(name, path, dtype, shape, data_base + begin, nbytes)


def element_count(shape: tuple[int, ...]) -> int | None:
    """The shape's element count, or None when a running product passes int64, as the safetensors library
    refuses it (its checked product, in usize): a later 0 makes the count 0, but torch's, computed the same
    way, overflows."""
    count = 1
    for size in shape:
        count *= size
        if count >= 2**63:
            return None
    return count


def torch_can_lay_out(dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """Whether an empty tensor can be viewed in this shape, as reading it does: torch strides an empty shape
    with wrapping products, and refuses a stride that wraps negative ([0, 3, 2**62]; [0, 4, 2**62] passes)."""
    try:
        torch.empty(0, dtype=dtype).view(shape)
    except RuntimeError:
        return False
    return True


def _check_layout(path: str, infos: dict[str, TensorInfo], data_base: int, file_size: int) -> None:
    """The tensors' ranges tile the data section exactly, as the safetensors library requires: no two
    overlap (one write would change another tensor) and no bytes are unaccounted for."""
    offset = data_base
    for info in sorted(infos.values(), key=lambda i: (i.data_start, i.nbytes)):
        if info.data_start != offset:
            problem = "overlaps the tensor before it" if info.data_start < offset else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {info.name!r}: data range {problem} (corrupt header)")
        offset += info.nbytes
    if offset != file_size:
        raise CheckpointError(f"{path}: {file_size - offset} bytes after the last tensor's data (corrupt header)")


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
    try:
        with open(path, "wb") as f:
            f.write(prefix)
            for t in contiguous.values():
                f.write(tensor_bytes(t))
    except OSError as e:
        if e.filename is None:  # a write's error (a full disk) names no file
            raise OSError(e.errno, e.strerror, path) from e
        raise
