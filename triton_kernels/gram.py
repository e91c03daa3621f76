"""Triton kernel of the Gram family, with the function and semantics of the C++ modules
(csrc/cpu/gram.cpp): `accumulate_gram(gram, x, mask)` adds x^T x over the rows of x [T, d] where
mask [T] is True (every row without a mask) to the upper triangle of the fp32 gram [d, d].

One program per BLOCK x BLOCK tile of the upper triangle (a 1-D grid over the tile pairs bi <= bj):
it runs over the tokens in steps of BLOCK_T, loads the two [BLOCK_T, BLOCK] column slices of x in
their storage dtype (masked-out tokens and rows past the end as 0, which add nothing), accumulates
their product in fp32 with tl.dot, then adds the sum to its tile of gram (load, add, store). Stores
are masked with col >= row, so the strictly lower triangle of diagonal tiles is never written.
Tiles are disjoint: no atomics, and the result is deterministic.

Accuracy is that of ops/gram.py: bf16 and fp16 feed tl.dot (tensor cores on the GPU) with an fp32
accumulator, their products exact; fp32 runs with input_precision="ieee", full fp32 products
(Triton's default for fp32 on NVIDIA GPUs is TF32, 10-bit mantissas, far outside the bound).

On CUDA tensors in production; the Triton interpreter (TRITON_INTERPRET=1) runs it on CPU tensors.
The interpreter's tl.dot multiplies bf16 tiles as their raw uint16 storage (numpy has no bf16), so
there bf16 tiles are widened to fp32 on the bits first (exact, as the GPU's products are); on the GPU
they go to tl.dot as bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from merge_engine.ops.gram import GRAM_INPUT_DTYPES

BLOCK = 64  # gram tile edge: 64 x 64 fp32 accumulator per program
BLOCK_T = 32  # tokens per step (the dot's K)
# No fused multiply-add outside tl.dot (whose fp32 lowering uses fma either way); given explicitly so
# that Triton's changing default neither matters nor warns.
_OPTIONS = dict(enable_fp_fusion=False)


@triton.jit
def _tile_of(pid, nb):
    """(bi, bj) of program pid: the upper-triangle tile pairs bi <= bj, row by row."""
    bi = 0
    rest = pid
    while rest >= nb - bi:
        rest -= nb - bi
        bi += 1
    return bi, bi + rest


@triton.jit
def _load_columns(x_ptr, tokens, keep, cols, d, WIDEN_BF16: tl.constexpr):
    """x[tokens, cols] as a [BLOCK_T, BLOCK] tile in x's dtype, 0 where not keep or past d; bf16 as
    fp32 (bit-exact) with WIDEN_BF16."""
    offs = tokens.to(tl.int64)[:, None] * d + cols[None, :]
    tile = tl.load(x_ptr + offs, mask=keep[:, None] & (cols[None, :] < d), other=0)
    if WIDEN_BF16:
        tile = (tile.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return tile


@triton.jit
def _gram_kernel(gram_ptr, x_ptr, mask_ptr, T, d, HAS_MASK: tl.constexpr, WIDEN_BF16: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    """gram[rows, cols] += x[kept, rows]^T x[kept, cols] (fp32 accumulator) where col >= row."""
    bi, bj = _tile_of(tl.program_id(0), tl.cdiv(d, BLOCK))
    rows = bi * BLOCK + tl.arange(0, BLOCK)
    cols = bj * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        keep = tokens < T
        if HAS_MASK:
            keep &= tl.load(mask_ptr + tokens, mask=keep, other=0) != 0
        a = _load_columns(x_ptr, tokens, keep, rows, d, WIDEN_BF16)
        b = _load_columns(x_ptr, tokens, keep, cols, d, WIDEN_BF16)
        # "ieee": full fp32 products for fp32 tiles (no effect on bf16/fp16 ones)
        acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
    offs = rows.to(tl.int64)[:, None] * d + cols[None, :]  # d * d passes 2**31 at d = 46341
    upper = (rows[:, None] < d) & (cols[None, :] < d) & (cols[None, :] >= rows[:, None])
    tl.store(gram_ptr + offs, tl.load(gram_ptr + offs, mask=upper) + acc, mask=upper)


def _check_args(gram: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    if gram.dtype != torch.float32 or gram.dim() != 2 or gram.shape[0] != gram.shape[1] or not gram.is_contiguous():
        raise ValueError(f"accumulate_gram: gram must be a contiguous float32 [d, d] tensor, got {gram.dtype} "
                         f"{list(gram.shape)}")
    if x.dtype not in GRAM_INPUT_DTYPES or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"accumulate_gram: activations must be a contiguous float32, bfloat16 or float16 [T, d] "
                         f"tensor, got {x.dtype} {list(x.shape)}")
    if x.shape[1] != gram.shape[0] or x.device != gram.device:
        raise ValueError(f"accumulate_gram: gram {list(gram.shape)} on {gram.device} does not match activations "
                         f"{list(x.shape)} on {x.device}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:1] or mask.device != x.device):
        raise ValueError(f"accumulate_gram: mask must be a bool [T] tensor on {x.device} for activations "
                         f"{list(x.shape)}, got {mask.dtype} {list(mask.shape)} on {mask.device}")


def accumulate_gram(gram: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """In place: the upper triangle of gram += x^T x over the rows of x where mask is True."""
    _check_args(gram, x, mask)
    d, tokens = gram.shape[0], x.shape[0]
    if d == 0 or tokens == 0:
        return
    nb = triton.cdiv(d, BLOCK)
    keep = None if mask is None else mask.contiguous().view(torch.uint8)
    widen = x.dtype == torch.bfloat16 and x.device.type == "cpu"  # CPU tensors: the interpreter (docstring)
    with torch.cuda.device_of(gram):  # Triton launches on the current device (no-op on CPU tensors)
        _gram_kernel[(nb * (nb + 1) // 2,)](gram, x, keep, tokens, d, HAS_MASK=mask is not None, WIDEN_BF16=widen,
                                            BLOCK=BLOCK, BLOCK_T=BLOCK_T, **_OPTIONS)
