"""Weighted sums and spherical interpolation (linear, slerp, nuslerp): references that follow
mergekit 0.1.5's arithmetic (fp32 accumulation, or fp64 for fp64 inputs)."""
from __future__ import annotations

import torch

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
_CHUNK = 1024 * 1024  # bounds fp32 scratch for large bf16 tensors


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("merge_engine::weighted_sum", mutates_args=())
def weighted_sum(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i (divided by sum_i w_i if normalize), accumulated in fp32, in the first input's dtype."""
    first = tensors[0]
    dtype = _compute_dtype(first)
    w = torch.tensor(weights, dtype=torch.float64).to(dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for x, wi in zip(tensors, w.to(first.device)):
        result.addcmul_(x, wi)
    if normalize:
        result.div_(w.sum().to(first.device))
    return result.to(first.dtype)


def _chunks(a: torch.Tensor, dtype: torch.dtype):
    for start in range(0, a.shape[1], _CHUNK):
        yield start, a[:, start:start + _CHUNK].to(dtype)


@torch.library.custom_op("merge_engine::slerp", mutates_args=())
def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the whole flattened tensors (t = 0 gives a), linear when
    |cos| > 0.9995; computed in fp32 (fp64 for fp64), returned in a's dtype."""
    dtype = _compute_dtype(a)
    x, y = a.reshape(1, -1), b.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=dtype, device=a.device)
    if not x.shape[1]:
        return ((1 - tt) * x + tt * y).reshape(a.shape).to(a.dtype)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c, dim=1, keepdim=True)
                                                   for _, c in _chunks(x, dtype)]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c, dim=1, keepdim=True)
                                                   for _, c in _chunks(y, dtype)]), dim=0)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    dot = torch.stack([((ca / norm_a) * (cb / norm_b)).sum(dim=1, keepdim=True)
                       for (_, ca), (_, cb) in zip(_chunks(x, dtype), _chunks(y, dtype))]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(x)
    for (start, ca), (_, cb) in zip(_chunks(x, dtype), _chunks(y, dtype)):
        result[:, start:start + _CHUNK] = coef_a * ca + coef_b * cb
    return result.reshape(a.shape)


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


@torch.library.custom_op("merge_engine::nuslerp", mutates_args=())
def nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """mergekit's nuslerp: slerp along the last dim (dim 0 if row_wise), or of the whole tensor
    if flatten; collinear vectors ((1 - cos^2) <= 1e-16) interpolate linearly. Input dtype throughout."""
    shape = a.shape
    dim = 0 if row_wise else -1
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)
    cos = torch.sum(_unit(a) * _unit(b), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= SLERP_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * a + t * b, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape).contiguous()
