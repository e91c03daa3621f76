"""Triton kernels of the permute family, with the functions and semantics of the C++ modules
(csrc/cpu/permute.cpp): `gather_blocks`, `scatter_add_blocks` (in place) and `swap_blocks` (in place),
moving blocks of parameters between the per-layer tensors of one kind (merge_engine/ops/permute.py).

A tensor is seen as [outer, row] with row = n_blocks * span around the block dimension: block b of
outer row o is the span elements at o * row + b * span. A program handles BLOCK elements of one
outer row (the grid is outer rows x tiles of a row); each element finds its block, that block's
source (or target) tensor through an int64 tensor of the tensors' data pointers, and its place there.

gather and swap move bits: they run on integer views of the tensors (int16 or int32), so every value
(NaN payloads, signed zeros, subnormals) arrives unchanged, on the GPU and in the interpreter alike.
scatter-add adds in fp32 and rounds once to the dtype, to nearest even, as torch does; bf16 goes
through the bit forms of triton_kernels/fisher.py (the interpreter truncates fp32 -> bf16 casts).

The ops layer validates indices (ranges, distinct pairs) before calling; these functions only check
dtypes, devices and contiguity. On CUDA tensors in production; the Triton interpreter
(TRITON_INTERPRET=1) runs them on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from merge_engine.ops.backends import KERNEL_DTYPES
from merge_engine.triton_kernels.fisher import _IEEE, _load, _store

BLOCK = 1024  # elements per program
BITS = {2: torch.int16, 4: torch.int32}  # integer views by element size: moves keep every bit


@triton.jit
def _element_of(width, tiles, span, BLOCK: tl.constexpr):
    """This program's outer row o, the positions r of its elements among the `width` of that row
    (`tiles` programs per row), their mask, and r's block b and offset k = r - b * span in it."""
    pid = tl.program_id(0).to(tl.int64)
    o = pid // tiles
    r = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
    b = r // span
    return o, r, r < width, b, r - b * span


@triton.jit
def _block_address(pointers_ptr, layer, block, o, k, row, span, mask, dtype: tl.constexpr):
    """Element k of block `block` in outer row o of tensors[layer]."""
    base = tl.load(pointers_ptr + layer, mask=mask, other=0).to(tl.pointer_type(dtype))
    return base + (o * row + block * span + k)


@triton.jit
def _gather_kernel(pointers_ptr, src_layer_ptr, src_block_ptr, out_ptr, row, span, tiles, BLOCK: tl.constexpr):
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    o, r, mask, b, k = _element_of(row, tiles, span, BLOCK)
    layer = tl.load(src_layer_ptr + b, mask=mask, other=0)
    block = tl.load(src_block_ptr + b, mask=mask, other=0)
    source = _block_address(pointers_ptr, layer, block, o, k, row, span, mask, dtype)
    tl.store(out_ptr + o * row + r, tl.load(source, mask=mask), mask=mask)


@triton.jit
def _scatter_add_kernel(pointers_ptr, src_layer_ptr, src_block_ptr, values_ptr, row, span, tiles,
                        BLOCK: tl.constexpr):
    dtype: tl.constexpr = values_ptr.dtype.element_ty
    o, r, mask, b, k = _element_of(row, tiles, span, BLOCK)
    layer = tl.load(src_layer_ptr + b, mask=mask, other=0)
    block = tl.load(src_block_ptr + b, mask=mask, other=0)
    target = _block_address(pointers_ptr, layer, block, o, k, row, span, mask, dtype)
    _store(target, 0, _load(target, 0, mask) + _load(values_ptr, o * row + r, mask), mask)


@triton.jit
def _swap_kernel(first_ptr, pointers_ptr, pairs_ptr, width, row, span, tiles, BLOCK: tl.constexpr):
    """Programs tile an outer row of all pairs' blocks (width = pairs x span elements, computed by the host:
    in the kernel the product of two int32 arguments wraps), pair m's at [m * span, (m + 1) * span); tensor 0
    (first_ptr) gives the dtype."""
    dtype: tl.constexpr = first_ptr.dtype.element_ty
    o, r, mask, m, k = _element_of(width, tiles, span, BLOCK)
    pair = pairs_ptr + 4 * m
    a = _block_address(pointers_ptr, tl.load(pair, mask=mask, other=0), tl.load(pair + 1, mask=mask, other=0),
                       o, k, row, span, mask, dtype)
    b = _block_address(pointers_ptr, tl.load(pair + 2, mask=mask, other=0), tl.load(pair + 3, mask=mask, other=0),
                       o, k, row, span, mask, dtype)
    x, y = tl.load(a, mask=mask), tl.load(b, mask=mask)
    tl.store(a, y, mask=mask)
    tl.store(b, x, mask=mask)


def _check_tensors(what: str, tensors: list[torch.Tensor]) -> None:
    for x in tensors:
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"merge_engine Triton kernel: {what} must be float32, bfloat16 or float16, got {x.dtype}")
        if x.device != tensors[0].device or x.dtype != tensors[0].dtype or x.shape != tensors[0].shape \
                or not x.is_contiguous():
            raise ValueError(f"merge_engine Triton kernel: {what} must be contiguous tensors of one shape and dtype "
                             f"on {tensors[0].device}")


def _layout(shape: torch.Size, dim: int, block_size: int) -> tuple[int, int, int]:
    """(outer, row, span) of a tensor around its block dimension."""
    outer = shape[:dim].numel()
    span = block_size * shape[dim + 1:].numel()
    return outer, shape[dim] * shape[dim + 1:].numel(), span


def _pointers(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=tensors[0].device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()])


def _launch(kernel, like: torch.Tensor, outer: int, width: int, *args) -> None:
    """kernel over outer rows x tiles of `width` elements, with args followed by (tiles, BLOCK)."""
    tiles = triton.cdiv(width, BLOCK)
    if outer * tiles == 0:
        return
    with torch.cuda.device_of(like):  # Triton launches on the current device (no-op on CPU tensors)
        kernel[(outer * tiles,)](*args, tiles, BLOCK=BLOCK, **_IEEE)


def gather_blocks(tensors: list[torch.Tensor], layer: int, src_layer: torch.Tensor, src_block: torch.Tensor,
                  dim: int, block_size: int) -> torch.Tensor:
    """A new tensor shaped like tensors[layer] whose block b is block src_block[b] of tensors[src_layer[b]]."""
    _check_tensors("tensors", tensors)
    out = torch.empty_like(tensors[layer])
    outer, row, span = _layout(out.shape, dim, block_size)
    _launch(_gather_kernel, out, outer, row, _pointers(tensors), src_layer, src_block, _bits(out), row, span)
    return out


def scatter_add_blocks(targets: list[torch.Tensor], layer: int, values: torch.Tensor, src_layer: torch.Tensor,
                       src_block: torch.Tensor, dim: int, block_size: int) -> None:
    """In place: block src_block[b] of targets[src_layer[b]] += block b of values (fp32 add, rounded once)."""
    _check_tensors("targets and values", [*targets, values])
    outer, row, span = _layout(values.shape, dim, block_size)
    _launch(_scatter_add_kernel, values, outer, row, _pointers(targets), src_layer, src_block, values, row, span)


def swap_blocks(tensors: list[torch.Tensor], pairs: torch.Tensor, dim: int, block_size: int) -> None:
    """In place: swaps block_a of tensors[layer_a] with block_b of tensors[layer_b] for each row of pairs."""
    _check_tensors("tensors", tensors)
    outer, row, span = _layout(tensors[0].shape, dim, block_size)
    width = pairs.shape[0] * span
    _launch(_swap_kernel, pairs, outer, width, _bits(tensors[0]), _pointers(tensors), pairs, width, row, span)
