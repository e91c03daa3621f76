"""Weighted sums and spherical interpolation (linear, slerp, nuslerp): references that follow
mergekit 0.1.5's arithmetic (fp32 accumulation, or fp64 for fp64 inputs)."""
from __future__ import annotations

from typing import Optional

import torch

from merge_engine.ops.library import check_out, contiguous, op, promoted, writable_in_place

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
_CHUNK = 1024 * 1024  # bounds fp32 scratch for large bf16 tensors
# torch.dot on a GPU is one cuBLAS call, whose length is a C int: torch refuses more than 2**31 - 1 elements
# there (GLM-4.5's fused experts.gate_up_proj [160, 3072, 5120] has 2.5e9). The CPU's has no bound and stays
# mergekit's single call.
_DOT_LIMITS = {"cuda": 2**31 - 1}
_DOT_PIECE = 1 << 26  # elements per piece past the bound: bounds the pieces' compute-dtype copies


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@op("weighted_sum", fake=contiguous("tensors"), out=True, floating=("tensors",))
def weighted_sum(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_i w_i x_i (divided by sum_i w_i if normalize), accumulated in fp32 (fp64 for fp64), in the first input's dtype,
    written into `out` (the first input's shape and dtype) when one is given.
    On the CPU, _CHUNK elements at a time through one scratch (the same arithmetic per element): a
    whole-tensor fp32 sum is fresh memory the size of two bf16 tensors, zeroed by the kernel on first
    touch, for every tensor (and the engine passes recycled buffers as out for the same reason)."""
    _check_alike("weighted_sum", tensors, weights, out)
    first = tensors[0]
    dtype = _compute_dtype(first)
    w = torch.tensor(weights, dtype=torch.float64).to(dtype)
    if not torch.isfinite(w).all():
        raise ValueError(f"weighted_sum: weights {list(weights)} must be finite in {dtype}")
    divisor = w.sum() if normalize else None
    if divisor is not None and float(divisor) == 0:
        raise ValueError(f"weighted_sum: the weights {list(weights)} sum to 0 and normalize divides by their sum")
    w, divisor = w.to(first.device), None if divisor is None else divisor.to(first.device)
    result = _contiguous_target(first, out, tensors)
    flat, out_flat = [x.reshape(-1) for x in tensors], result.view(-1)
    n = out_flat.numel()
    step = _CHUNK if first.device.type == "cpu" else max(n, 1)
    scratch = torch.empty(min(step, n), dtype=dtype, device=first.device)
    for start in range(0, n, step):
        acc = scratch[:min(step, n - start)].zero_()
        for x, wi in zip(flat, w):
            acc.addcmul_(x[start:start + acc.numel()], wi)
        if divisor is not None:
            acc.div_(divisor)
        out_flat[start:start + acc.numel()].copy_(acc)
    return _delivered(result, out)


def _check_alike(name: str, tensors: list[torch.Tensor], weights: list[float] | None,
                 out: Optional[torch.Tensor]) -> None:
    """ValueError unless the tensors share one shape and device (one weight each) and out is like the first."""
    if not tensors:
        raise ValueError(f"{name} needs at least one tensor")
    if weights is not None and len(weights) != len(tensors):
        raise ValueError(f"{name}: {len(tensors)} tensors but {len(weights)} weights")
    first = tensors[0]
    for i, x in enumerate(tensors[1:], 1):
        if x.shape != first.shape or x.device != first.device:
            raise ValueError(f"{name}: tensor {i} has shape {list(x.shape)} on {x.device}, tensor 0 "
                             f"{list(first.shape)} on {first.device}")
    if out is not None:
        check_out(name, out, first)


def _contiguous_target(like: torch.Tensor, out: Optional[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """Where to write a result of like's shape and dtype chunk by chunk: out where writable_in_place, else a fresh
    contiguous tensor (_delivered copies it into out)."""
    if out is not None and writable_in_place(out, inputs):
        return out
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _delivered(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The result, in out when one was given (copied there unless it was written there)."""
    if out is None or result is out:
        return result
    return out.copy_(result)


class _ChunkPairs:
    """The flattened (1, n) inputs of slerp in chunks of _CHUNK elements, each pass converting both chunks
    into the same two compute-dtype scratch buffers (in-place arithmetic on them gives the values the
    reference's out-of-place expressions give, element for element)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype):
        self.x, self.y = x, y
        step = min(_CHUNK, x.shape[1])
        self.sx = torch.empty((1, step), dtype=dtype, device=x.device)
        self.sy = torch.empty((1, step), dtype=dtype, device=x.device)

    def __iter__(self):
        n = self.x.shape[1]
        for start in range(0, n, _CHUNK):
            k = min(_CHUNK, n - start)
            cx, cy = self.sx[:, :k], self.sy[:, :k]
            cx.copy_(self.x[:, start:start + k])
            cy.copy_(self.y[:, start:start + k])
            yield start, cx, cy


@op("slerp", fake=contiguous("a"), out=True, floating=("a", "b"))
def slerp(t: float, a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Spherical interpolation of the whole flattened tensors (t = 0 gives a), linear when
    |cos| > 0.9995; computed in fp32 (fp64 for fp64), returned in a's dtype (written into `out`, a
    tensor of a's shape and dtype, when one is given)."""
    _check_alike("slerp", [a, b], None, out)
    dtype = _compute_dtype(a)
    x, y = a.reshape(1, -1), b.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=dtype, device=a.device)
    if not x.shape[1]:
        return ((1 - tt) * x + tt * y).reshape(a.shape).to(a.dtype)  # empty: nothing to write into out
    pairs = _ChunkPairs(x, y, dtype)
    chunk_norms = [(torch.linalg.vector_norm(cx, dim=1, keepdim=True), torch.linalg.vector_norm(cy, dim=1, keepdim=True))
                   for _, cx, cy in pairs]
    norm_a, norm_b = (torch.linalg.vector_norm(torch.stack(list(norms)), dim=0) for norms in zip(*chunk_norms))
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    dot = torch.stack([cx.div_(norm_a).mul_(cy.div_(norm_b)).sum(dim=1, keepdim=True)
                       for _, cx, cy in pairs]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    target = _contiguous_target(a, out, [a, b])
    result = target.view(x.shape)
    for start, cx, cy in pairs:  # coef_a * ca + coef_b * cb
        result[:, start:start + cx.shape[1]] = cx.mul_(coef_a).add_(cy.mul_(coef_b))
    return _delivered(target, out)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.dot of two 1-D tensors of one dtype; past the device's bound on one call's length (_DOT_LIMITS), the
    sum of the pieces' dots in the compute dtype (fp32, fp64 for fp64), rounded once to the dtype."""
    limit = _DOT_LIMITS.get(a.device.type)
    if limit is None or a.numel() <= limit:
        return torch.dot(a, b)
    dtype = _compute_dtype(a)
    total = sum(torch.dot(a[s:s + _DOT_PIECE].to(dtype), b[s:s + _DOT_PIECE].to(dtype))
                for s in range(0, a.numel(), _DOT_PIECE))
    return total.to(a.dtype)


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


@op("nuslerp", fake=promoted("a", "b", contiguous=True), floating=("a", "b"))
def nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """mergekit's nuslerp: slerp along the last dim (dim 0 if row_wise), or of the whole tensor
    if flatten; collinear vectors ((1 - cos^2) <= 1e-16) interpolate linearly. Input dtype throughout."""
    _check_alike("nuslerp", [a, b], None, None)
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


@op("multislerp", fake=promoted("tensors", "base", contiguous=True), floating=("tensors", "base"))
def multislerp(tensors: list[torch.Tensor], weights: list[float], base: Optional[torch.Tensor] = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's multislerp: barycentric interpolation of K tensors on the hypersphere (whole flattened
    tensors, minus base when given). Each is projected to the unit sphere, then to the tangent space at
    the weighted mean direction; the weighted tangent mean goes back through the exponential map and is
    scaled by the weighted mean of the norms. Weights are divided by their sum if normalize_weights.
    One input is returned as is (the base is then unused). A zero weighted mean direction falls back to
    the weighted sum for two inputs and raises ValueError for more (a tensor of 0 elements, which has no direction,
    gives an empty one). Input dtype throughout."""
    if not tensors:
        raise ValueError("multislerp needs at least one tensor")
    if len(tensors) != len(weights):
        raise ValueError(f"multislerp: {len(tensors)} tensors but {len(weights)} weights")
    if len(tensors) == 1:
        return tensors[0].clone()
    _check_alike("multislerp", tensors if base is None else [*tensors, base], None, None)
    if normalize_weights and sum(weights) == 0:
        raise ValueError(f"multislerp: the weights {list(weights)} sum to 0 and normalize_weights divides by their sum")
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.reshape(stacked.shape[0], -1)  # a stack keeps its inputs' memory format
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if flat.shape[1] == 0:  # a tensor of 0 elements: nothing to interpolate (its mean is not antipodal inputs)
        return torch.empty_like(stacked[0])
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise ValueError("multislerp: the weighted mean of the normalized inputs is zero (antipodal inputs "
                             "whose weights balance out); use different weights")
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return result if base is None else result + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


@op("karcher_mean", fake="tensors", floating=("tensors",))
def karcher_mean(tensors: list[torch.Tensor], weights: list[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """mergekit's weighted Karcher (Riemannian) mean of the flattened tensors' directions on the unit
    sphere, scaled by sum_i w_i |x_i|. Inputs with norm <= tol take no part in the direction (their
    weight still counts in the scale); the others' weights are renormalized to sum to 1. Starts from
    the normalized weighted mean (the first direction if that is ~0), then at most max_iter steps of
    the exp map of the weighted mean log map, stopping once the step is shorter than tol. Norms in fp32
    (fp64 for fp64), unit vectors in the input dtype, which all tensors share (ValueError otherwise)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"karcher_mean: {len(tensors)} tensors but {len(weights)} weights")
    if len(tensors) == 1:
        return tensors[0].clone()
    _check_alike("karcher_mean", tensors, weights, None)
    for i, x in enumerate(tensors[1:], 1):  # torch.dot of the units takes one dtype
        if x.dtype != tensors[0].dtype:
            raise ValueError(f"karcher_mean: tensor {i} is {x.dtype}, tensor 0 {tensors[0].dtype}; all must share one dtype")
    dtype = _compute_dtype(tensors[0])
    norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(weights[i] for i in valid)
    if total == 0:
        raise ValueError(f"karcher_mean: the weights of the inputs with a direction (norm > tol) sum to 0: {weights}")
    alphas = [weights[i] / total for i in valid]
    units = [units[i] for i in valid]

    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            dot = torch.clamp(_dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    # mergekit's scale * mean, in the input dtype also for 0-dim tensors (two 0-dim tensors promote to fp32)
    return (sum(w * n for w, n in zip(weights, norms)) * mean).to(mean.dtype)


@op("nearswap", fake=promoted("base", "other"), floating=("base", "other"))
def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's nearswap: per element, lerp from base toward other by w = clamp(t / |base - other|, 0, 1)
    (|base - other| floored at 1e-6), so elements closer than t take other's value and far ones stay
    near the base. Input dtype."""
    _check_alike("nearswap", [base, other], None, None)
    w = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * other + (1 - w) * base
