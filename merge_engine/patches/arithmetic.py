"""The arithmetic of weight patches: the specification every patch path (files, in place, in memory) follows.

A patch stores each changed tensor's difference d = TUNED - BASE, computed in the compute precision (fp32 for
16-bit weights, fp64 for fp32/fp64 weights): exactly where neither value is over 2^15 (bf16), 2^12 (fp16) or
2^28 (fp32) times the other, else rounded once (fixups still make one float patch at scale 1 exact). Applying
patches with scales s_i to a weight W is

    round_to_W.dtype( W + s_1 * d_1 + s_2 * d_2 + ... )      (in the compute precision, patches in the order given)

and removing them is the same with -s_i. Stored forms:
    float (bf16, fp16, fp32): d rounded to that dtype, plus "fixups": the few elements where one patch at
        scale 1 would not give TUNED's bits back on apply or BASE's on remove (where |d| exceeds the weight
        itself, so that rounding d loses bits), stored as flat indices with both bit patterns. With fixups,
        one float patch at scale 1 applies and removes exactly.
    int8 / int4: per row (dim 0; a 1-D tensor is one row) a scale = max|d| / qmax (127, 7) and
        q = round(d / scale) in [-qmax, qmax]; |d - q * scale| <= scale / 2 (+ fp32 rounding of d / scale).
        int4 values are stored two to a byte, q + 8, low nibble first, rows padded to an even length.
"""
from __future__ import annotations

import hashlib
import math
import zlib

import torch

from merge_engine.io.raw import tensor_bytes

QUANTIZED = {"int8": 127, "int4": 7}  # storage -> qmax
FLOATS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STORAGES = (*FLOATS, *QUANTIZED)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where differences are formed and patches added: wide enough that one rounding happens, at the end."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def difference(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """TUNED - BASE in the compute precision."""
    return tuned.to(compute_dtype(base.dtype), copy=True).sub_(base)  # base widened exactly in the subtraction


def add_scaled(weight: torch.Tensor, deltas: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """round(weight + sum of scale * delta), summed in the compute precision in the order given."""
    acc = weight.to(compute_dtype(weight.dtype), copy=True)
    for delta, scale in deltas:
        acc.add_(delta.to(acc.device, acc.dtype), alpha=scale)
    return acc.to(weight.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers of its width (for exact comparisons; -0.0 != 0.0, NaN == NaN)."""
    return t.contiguous().view(_BITS[t.element_size()])


def fixups(base: torch.Tensor, tuned: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Flat indices (index_dtype) where one patch of difference `stored` at scale 1 misses TUNED on apply or BASE
    on remove."""
    applied = add_scaled(base, [(stored, 1.0)])
    removed = add_scaled(tuned, [(stored, -1.0)])
    wrong = (bits(applied) != bits(tuned)) | (bits(removed) != bits(base))
    return wrong.reshape(-1).nonzero().squeeze(1).to(index_dtype(base.numel()))


def index_dtype(numel: int) -> torch.dtype:
    """Fixup indices: int32 where they fit (4 bytes a fixup fewer), else int64."""
    return torch.int32 if numel <= 2**31 else torch.int64


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """The per-row view quantization works on: dim 0 by the rest (a 1-D tensor is one row)."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def quantize_rows(d: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for a difference; q is int8, or uint8 with two int4 values per byte."""
    qmax = QUANTIZED[storage]
    rows = as_rows(d.float())
    scale = rows.abs().amax(dim=1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (rows / safe[:, None]).round_().clamp_(-qmax, qmax).to(torch.int8)
    return (pack_int4(q) if storage == "int4" else q), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, storage: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 difference a quantized patch stores, in the tensor's shape."""
    cols = math.prod(shape) // scale.numel() if scale.numel() else 0
    values = unpack_int4(q, cols) if storage == "int4" else q
    return (values.float() * scale[:, None]).reshape(shape)


def quantized_shape(shape: tuple[int, ...], storage: str) -> tuple[int, int]:
    """Shape of q for a tensor of `shape`."""
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows if rows else 0
    return (rows, (cols + 1) // 2) if storage == "int4" else (rows, cols)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-7, 7], [rows, cols] -> uint8 [rows, ceil(cols / 2)], low nibble first."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nibbles = (q + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=2).reshape(packed.shape[0], -1)[:, :cols]


def fingerprint(t: torch.Tensor) -> str:
    """A short digest of a tensor: its dtype, shape and the CRC-32 of all its bytes (3 GB/s on one core). It tells
    one checkpoint's tensor from another's (a different base, a keyed copy with rows swapped); it is not a
    cryptographic hash."""
    data = t.detach().contiguous().cpu()
    return hashlib.blake2b(f"{t.dtype}|{list(t.shape)}|{zlib.crc32(tensor_bytes(data))}".encode(),
                           digest_size=16).hexdigest()
