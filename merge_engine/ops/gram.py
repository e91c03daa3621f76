"""Gram ops: the input Gram matrix G = X^T X of a linear layer, accumulated over batches of activations
(RegMean, Bayesian Model Merging: merge_engine/methods/regression.py).

- accumulate_gram(gram, x, mask): in place, gram += sum over kept tokens t of x_t^T x_t, for
  activations x [..., d] in fp32/bf16/fp16 (any leading dims are tokens) and an optional bool mask
  over the leading dims (False: a padding token, left out). The sum runs in fp32 (fp64 for an fp64
  gram, which only the reference serves). Only the UPPER triangle (j >= i) of gram is specified after
  a call: kernels compute the upper-triangle blocks only (half the work) and leave the strictly lower
  triangle as it was, so a caller mirrors once, at the end of the accumulation:
- mirror_upper_(gram): in place, gram[j, i] = gram[i, j] for j > i (the result is exactly symmetric).

Accuracy (what the tests hold every backend to): each entry is a sum of T products accumulated in
fp32 in some order. bf16 and fp16 products are exact in fp32 (8 + 8 and 11 + 11 significant bits fit
in 24), fp32 products round once, so against the exact sum
    |G_ij - G*_ij| <= gamma(T + 1) * sum_t |x_ti| |x_tj|,   gamma(n) = n u / (1 - n u), u = 2^-24,
whatever the summation order (Higham, Accuracy and Stability of Numerical Algorithms, 3.1); blocked
and tree orders do better. The reference is torch's fp32 matrix product of the kept rows. NVIDIA tensor
cores truncate rather than round when they add, so the GPU tests allow twice that unit for the
bf16/fp16 tensor-core path.
"""
from __future__ import annotations

from typing import Optional

import torch

from merge_engine.ops import backends
from merge_engine.ops.library import op, spans_overlap

GRAM_INPUT_DTYPES = backends.KERNEL_DTYPES  # of the activations the kernels take


def check_gram_args(gram: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    d = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or gram.shape != (d, d):
        raise ValueError(f"accumulate_gram: gram must be [d, d] for activations [..., d]; got gram "
                         f"{list(gram.shape)} and activations {list(x.shape)}")
    if gram.dtype not in (torch.float32, torch.float64) or not x.dtype.is_floating_point:
        raise ValueError(f"accumulate_gram: gram must be float32 (or float64) and activations floating point; "
                         f"got {gram.dtype} and {x.dtype}")
    if gram.device != x.device:
        raise ValueError(f"accumulate_gram: gram is on {gram.device} but the activations on {x.device}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:-1] or mask.device != x.device):
        raise ValueError(f"accumulate_gram: mask must be a bool tensor of shape {list(x.shape[:-1])} on "
                         f"{x.device}; got {mask.dtype} {list(mask.shape)} on {mask.device}")
    if spans_overlap(x, gram):
        raise ValueError("accumulate_gram: the activations share memory with the gram they are added into")


def kept_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The activations as [tokens, d], without the masked-out tokens."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1)]


def accumulate_gram_reference(gram: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """gram += X^T X over the kept rows X, one matrix product in gram's dtype (the whole matrix)."""
    check_gram_args(gram, x, mask)
    if not x.numel():  # no tokens, or d = 0: nothing to add
        return
    rows = kept_rows(x, mask).to(gram.dtype)
    gram.addmm_(rows.T, rows)


@op("accumulate_gram", mutates_args=("gram",))
def accumulate_gram(gram: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    """In place: gram += x^T x over the tokens where mask is True (upper triangle; see mirror_upper_)."""
    accumulate_gram_reference(gram, x, mask)


def _accumulate_with(backend, gram, x, mask):
    if (backend is None or gram.dtype != torch.float32 or x.dtype not in GRAM_INPUT_DTYPES
            or not gram.is_contiguous()):
        return accumulate_gram_reference(gram, x, mask)
    check_gram_args(gram, x, mask)
    if not x.numel():
        return
    backend.accumulate_gram(gram, x.reshape(-1, x.shape[-1]).contiguous(),
                            None if mask is None else mask.reshape(-1).contiguous())


@accumulate_gram.register_kernel("cpu")
def _accumulate_gram_cpu(gram, x, mask=None):
    _accumulate_with(backends.cpu_extension(), gram, x, mask)


@accumulate_gram.register_kernel("cuda")
def _accumulate_gram_cuda(gram, x, mask=None):
    _accumulate_with(backends.gpu_backend("gram"), gram, x, mask)


MIRROR_BLOCK = 256


def mirror_upper_(gram: torch.Tensor) -> torch.Tensor:
    """In place: the strictly lower triangle becomes the transpose of the upper one. Returns gram.
    Block by block, so it needs no full-size temporaries (one block's at most)."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"mirror_upper_: need a square matrix, got {list(gram.shape)}")
    d, b = gram.shape[0], MIRROR_BLOCK
    for i in range(0, d, b):
        diagonal = gram[i:i + b, i:i + b]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        for j in range(i + b, d, b):
            gram[j:j + b, i:i + b].copy_(gram[i:i + b, j:j + b].T)
    return gram


def pack_upper(gram: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) row by row, as a 1-D tensor of d (d + 1) / 2 entries.
    Row by row, so it allocates nothing beside the result (index tensors of the triangle would take
    twice the fp32 matrix: 6.6 GB for a 70B model's MLP Gram)."""
    d = gram.shape[0]
    packed = gram.new_empty(d * (d + 1) // 2)
    for row, start in enumerate(_row_starts(d)):
        packed[start:start + d - row] = gram[row, row:]
    return packed


def unpack_upper(packed: torch.Tensor, d: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The symmetric [d, d] matrix whose upper triangle pack_upper gave."""
    if packed.shape != (d * (d + 1) // 2,):
        raise ValueError(f"unpack_upper: {list(packed.shape)} is not the packed upper triangle of a {d} x {d} matrix")
    gram = torch.empty(d, d, dtype=dtype or packed.dtype, device=packed.device)
    for row, start in enumerate(_row_starts(d)):
        gram[row, row:] = packed[start:start + d - row]
    return mirror_upper_(gram)


def _row_starts(d: int):
    """Where each row of a d x d upper triangle starts in its packed form."""
    start = 0
    for row in range(d):
        yield start
        start += d - row
