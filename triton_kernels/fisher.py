"""Triton kernels of the Fisher family, with the functions and semantics of the C++ modules
(csrc/cpu/fisher.cpp): the in-place accumulation F += scale * g^2 (`accumulate_fisher`) and the
Fisher-weighted average of K tensors in one pass (`fisher_merge`).

Both reproduce the references in merge_engine/ops/fisher.py bit for bit: every step is the
reference's fp32 operation, in its order, rounded once. So the scalars are rounded to fp32 on the
host as the reference rounds them (torch.tensor(x, dtype=torch.float32)); model 0 starts num and den
(num = term_0, not 0 + term_0, which differs in the sign of a zero); max(F, floor) keeps F on a tie
(F < floor ? floor : F, as the reference and the CPU kernels: torch's own clamp_min picks either zero of
a -0 / +0 tie, depending on where the element falls in its vector loop); and the exactness rules of
triton_kernels/task_vectors.py apply: launches with enable_fp_fusion=False (no fused multiply-add),
and division by tl.math.div_rn (Triton's `/` on fp32 is not correctly rounded on NVIDIA GPUs).
bf16 is converted on the bits both ways (round to nearest even on the way down): the interpreter
truncates fp32 -> bf16 casts, and its casts between bf16 and fp32 mangle subnormals (Fishers reach
them: squared gradients); the bit forms are exact on the GPU too.

fisher_merge reads the K models in place through int64 tensors of their data pointers (any K), and
counts each model's negative, NaN and Inf Fisher entries during the merge pass (one atomic per block
and model, only where there are any); the ValueError for the first bad model is raised after it.

On CUDA tensors in production; the Triton interpreter (TRITON_INTERPRET=1) runs them on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from merge_engine.ops.fisher import FISHER_DTYPES, invalid_fisher_message

BLOCK = 1024  # elements per program
_IEEE = dict(enable_fp_fusion=False)  # launch option of every kernel: no fused multiply-add
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a Fisher entry is valid iff 0 <= F <= FLT_MAX


@triton.jit
def _load(ptr, offs, mask):
    """Elements of a float32, bfloat16 or float16 tensor as fp32 (exact)."""
    dtype: tl.constexpr = ptr.dtype.element_ty
    x = tl.load(ptr + offs, mask=mask, other=0)
    if dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, x, mask):
    """Stores fp32 x rounded to the tensor's dtype, to nearest even."""
    dtype: tl.constexpr = ptr.dtype.element_ty
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)  # a GPU's NaN, 0x7FFFFFFF, would carry into the sign: -0
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(dtype), mask=mask)


@triton.jit
def _accumulate_kernel(fisher_ptr, grad_ptr, n, scale, BLOCK: tl.constexpr):
    """fisher = fisher + (g * g) * scale in fp32, rounded to fisher's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = _load(grad_ptr, offs, mask)
    _store(fisher_ptr, offs, _load(fisher_ptr, offs, mask) + (g * g) * scale, mask)


@triton.jit
def _model_terms(theta, fisher_ptr, j, offs, mask, coefficients_ptr, floors_ptr, bad_ptr):
    """Model j's d = max(F, floor) * c and d * theta (fp32); adds its bad Fisher entries to bad[j]."""
    f = _load(fisher_ptr, offs, mask)
    bad = tl.sum((~((f >= 0) & (f <= FLT_MAX))).to(tl.int64), axis=0)  # NaN fails both tests
    tl.atomic_add(bad_ptr + j, bad, mask=bad > 0)
    floor = tl.load(floors_ptr + j)
    d = tl.where(f < floor, floor, f) * tl.load(coefficients_ptr + j)
    return d * theta, d


@triton.jit
def _merge_kernel(param0_ptr, fisher0_ptr, params_ptr, fishers_ptr, coefficients_ptr, floors_ptr, bad_ptr, out_ptr,
                  n, K, BLOCK: tl.constexpr):
    """sum_j d_j theta_j / sum_j d_j (model order, fp32) where the sum of d is > 0, else theta_0.
    Model 0 comes as tensors (they give the kernel its two dtypes), every model through params_ptr
    and fishers_ptr (int64 data pointers)."""
    pdtype: tl.constexpr = param0_ptr.dtype.element_ty
    fdtype: tl.constexpr = fisher0_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    theta0 = _load(param0_ptr, offs, mask)
    num, den = _model_terms(theta0, fisher0_ptr, 0, offs, mask, coefficients_ptr, floors_ptr, bad_ptr)
    for j in range(1, K):
        param_ptr = tl.load(params_ptr + j).to(tl.pointer_type(pdtype))
        theta = _load(param_ptr, offs, mask)
        fisher_ptr = tl.load(fishers_ptr + j).to(tl.pointer_type(fdtype))
        term, d = _model_terms(theta, fisher_ptr, j, offs, mask, coefficients_ptr, floors_ptr, bad_ptr)
        num += term
        den += d
    positive = den > 0
    mean = tl.math.div_rn(num, tl.where(positive, den, 1.0))  # the divisor 1 is never selected
    _store(out_ptr, offs, tl.where(positive, mean, theta0), mask)


def _check_tensors(what: str, tensors: list[torch.Tensor], device: torch.device) -> None:
    for x in tensors:
        if x.dtype not in FISHER_DTYPES:
            raise TypeError(f"merge_engine Triton kernel: {what} must be float32, bfloat16 or float16, got {x.dtype}")
        if x.device != device or not x.is_contiguous():
            raise ValueError(f"merge_engine Triton kernel: {what} must be contiguous tensors on {device}")


def accumulate_fisher(fisher: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    """In place: fisher += (grad^2) * scale in fp32 (accumulate_fisher_reference)."""
    _check_tensors("fisher and grad", [fisher, grad], fisher.device)
    if fisher.shape != grad.shape:
        raise ValueError(f"accumulate_fisher: fisher has shape {list(fisher.shape)} but grad {list(grad.shape)}")
    n = fisher.numel()
    if n == 0:
        return
    scale32 = float(torch.tensor(scale, dtype=torch.float32))  # exact in fp32: the kernel gets it unchanged
    with torch.cuda.device_of(fisher):  # Triton launches on the current device (no-op on CPU tensors)
        _accumulate_kernel[(triton.cdiv(n, BLOCK),)](fisher, grad, n, scale32, BLOCK=BLOCK, **_IEEE)


def fisher_merge(params: list[torch.Tensor], fishers: list[torch.Tensor], coefficients: list[float],
                 floors: list[float]) -> torch.Tensor:
    """Fisher-weighted average of K models in one pass (fisher_merge_reference); ValueError naming the
    first model whose Fisher has a negative, NaN or Inf entry."""
    k = len(params)
    if k == 0 or not (len(fishers) == len(coefficients) == len(floors) == k):
        raise ValueError("fisher_merge: need one Fisher, coefficient and floor per param, and at least one param")
    device = params[0].device
    _check_tensors("params", params, device)
    _check_tensors("Fishers", fishers, device)
    if any(x.shape != params[0].shape for x in params + fishers) or len({p.dtype for p in params}) > 1 \
            or len({f.dtype for f in fishers}) > 1:
        raise ValueError("fisher_merge: params and Fishers must share one shape; params one dtype, Fishers another")
    n = params[0].numel()
    out = torch.empty_like(params[0])
    if n == 0:
        return out
    pointers = torch.tensor([[p.data_ptr() for p in params], [f.data_ptr() for f in fishers]], dtype=torch.int64,
                            device=device)
    scalars = torch.tensor([coefficients, floors], dtype=torch.float32, device=device)  # rounded as the reference
    bad = torch.zeros(k, dtype=torch.int64, device=device)
    with torch.cuda.device_of(out):  # Triton launches on the current device (no-op on CPU tensors)
        _merge_kernel[(triton.cdiv(n, BLOCK),)](params[0], fishers[0], pointers[0], pointers[1], scalars[0],
                                                scalars[1], bad, out, n, k, BLOCK=BLOCK, **_IEEE)
    for j, count in enumerate(bad.tolist()):
        if count:
            raise ValueError(invalid_fisher_message(j, count))
    return out
