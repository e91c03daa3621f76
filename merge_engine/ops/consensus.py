"""Sign election and the disjoint weighted mean: the TIES family (task_arithmetic, ties, dare_*,
breadcrumbs*, della*) in one call. Pure-PyTorch references mirroring mergekit 0.1.5's arithmetic
order exactly, so that outputs are bit-identical to mergekit's where the method is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch

from merge_engine.ops import backends
from merge_engine.ops import sparsify as sp
from merge_engine.ops.library import kernel_out, op
from merge_engine.ops.random import philox_key
from merge_engine.ops.select import check_finite


def _one_expert(weighted_deltas: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Fake: the shape of one expert's deltas (dim 0 is the experts)."""
    return weighted_deltas.new_empty(weighted_deltas.shape[1:])


@op("elect_sign", fake=_one_expert, floating=("weighted_deltas",))
def elect_sign(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES "sum" election over dim 0: +1 where the sum of weighted deltas is >= 0 (a zero sum
    elects +1), else -1; in the deltas' dtype."""
    return (weighted_deltas.sum(dim=0) >= 0).to(weighted_deltas.dtype) * 2 - 1


@op("disjoint_mean", fake=_one_expert, floating=("weighted_deltas",))
def disjoint_mean(weighted_deltas: torch.Tensor, weights: list[float], normalize: bool = True) -> torch.Tensor:
    """Sum of the weighted deltas that agree with the elected sign, divided (if normalize) by the
    sum of the agreeing models' weights (1 where none agrees). Trimmed zeros never agree."""
    w = _weights_like(weighted_deltas, weights)
    agree = weighted_deltas.sign() == elect_sign(weighted_deltas)
    mixed = (weighted_deltas * agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


def _weights_like(deltas: torch.Tensor, weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    return w.reshape(-1, *([1] * (deltas.dim() - 1)))


def _sparsify(delta: torch.Tensor, method: str, density: float, gamma: float, epsilon: float,
              rescale: bool, seed: int, tensor_name: str, stream: int) -> torch.Tensor:
    if method == "magnitude":
        return sp.trim_by_magnitude(delta, density, rescale)
    if method == "random":
        return sp.drop_random(delta, density, seed, tensor_name, stream, rescale)
    if method == "outliers":
        return sp.trim_outliers(delta, density, gamma, rescale)
    if method == "rank":
        return sp.drop_by_rank(delta, density, epsilon, seed, tensor_name, stream, rescale)
    raise ValueError(f"unknown sparsification '{method}' (expected one of {sp.SPARSIFIERS} or '')")


def merge_task_vectors_reference(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
                       densities: list[float], sparsify: str = "", consensus: bool = False,
                       normalize: bool = False, rescale: bool = False, lambda_: float = 1.0,
                       gammas: Optional[list[float]] = None, epsilons: Optional[list[float]] = None, seed: int = 0,
                       tensor_name: str = "") -> torch.Tensor:
    """base + lambda * mix(sparsify(expert_i - base) * w_i), in the base's dtype.

    sparsify: "" (none), "magnitude" (TIES), "random" (DARE), "outliers" (breadcrumbs), "rank" (DELLA);
    each expert is sparsified on its own, before weighting. consensus: TIES sum-sign election and the
    disjoint mean; without it the plain weighted sum, divided by sum(w) if normalize (|sum(w)| < 1e-8 -> 1, compared
    in the base's dtype as mergekit compares it: fp16's 1e-8 is 0, so there a zero sum divides by zero).
    Random sparsifiers draw from Philox keyed by (seed, tensor_name, expert index).
    NaN or Inf in any input raise ValueError.
    """
    check_merge_arguments(base, experts, weights, densities, sparsify, gammas, epsilons, lambda_)
    if not experts:
        return base.clone()
    check_finite(base, "the base")
    for i, expert in enumerate(experts):
        check_finite(expert, f"expert {i}")
    deltas = base.new_empty((len(experts), *base.shape))
    for i, expert in enumerate(experts):
        delta = expert - base
        if sparsify:
            delta = _sparsify(delta, sparsify, densities[i], gammas[i] if gammas else 0.0,
                              epsilons[i] if epsilons else 0.0, rescale, seed, tensor_name, i)
        deltas[i] = delta
    w = _weights_like(deltas, weights)
    deltas.mul_(w)
    if consensus:
        mixed = disjoint_mean(deltas, list(weights), normalize)
    else:
        mixed = deltas.sum(dim=0)
        if normalize:
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


@op("merge_task_vectors", fake="base", out=True, floating=("base", "experts"))
def merge_task_vectors(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
                       densities: list[float], sparsify: str = "", consensus: bool = False,
                       normalize: bool = False, rescale: bool = False, lambda_: float = 1.0,
                       gammas: Optional[list[float]] = None, epsilons: Optional[list[float]] = None, seed: int = 0,
                       tensor_name: str = "", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TIES, DARE, breadcrumbs, DELLA and task arithmetic in one call (the parameters are explained in
    merge_task_vectors_reference). base: the base tensor; experts: tensors of its shape and dtype; weights,
    densities (and gammas for breadcrumbs, epsilons for DELLA): one value per expert; sparsify: "" (none),
    "magnitude" (TIES), "random" (DARE), "outliers" (breadcrumbs) or "rank" (DELLA); consensus: TIES sign
    election; seed and tensor_name key the random draws. Returns base + lambda_ * merged deltas in base's
    dtype, written into `out` (a tensor of base's shape and dtype) when one is given. An input holding NaN or
    Inf raises ValueError; the compiled kernels find it in the pass that writes the result, so `out` may then
    hold part of a result, as an ATen out= argument may after an error."""
    return merge_task_vectors_reference(base, experts, weights, densities, sparsify, consensus, normalize, rescale,
                                        lambda_, gammas, epsilons, seed, tensor_name)


def check_merge_arguments(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
                          densities: list[float], sparsify: str, gammas: Optional[list[float]],
                          epsilons: Optional[list[float]], lambda_: float = 1.0) -> None:
    """What every backend refuses alike, before reading any data: experts unlike the base (the references
    would broadcast or promote), one weight and density per expert (and gamma, epsilon when given),
    finite values, a known sparsifier."""
    if not base.is_floating_point():
        raise ValueError(f"merge_task_vectors: the base must be a floating-point tensor, got {base.dtype}")
    for i, expert in enumerate(experts):
        if (expert.shape, expert.dtype, expert.device) != (base.shape, base.dtype, base.device):
            raise ValueError(f"merge_task_vectors: expert {i} is a {expert.dtype} tensor of shape "
                             f"{list(expert.shape)} on {expert.device}; the base is a {base.dtype} tensor of shape "
                             f"{list(base.shape)} on {base.device}")
    if sparsify not in sp.SPARSIFY_CODES:
        raise ValueError(f"unknown sparsification '{sparsify}' (expected one of {sp.SPARSIFIERS} or '')")
    for name, values in (("weights", weights), ("densities", densities), ("gammas", gammas),
                         ("epsilons", epsilons)):
        if values is None and name in ("gammas", "epsilons"):  # each expert's is 0
            continue
        if len(values) != len(experts):
            raise ValueError(f"merge_task_vectors: {len(experts)} experts but {len(values)} {name}")
        sp.check_finite_values("merge_task_vectors", **{f"{name}[{i}]": v for i, v in enumerate(values)})
    sp.check_finite_values("merge_task_vectors", lambda_=lambda_)


def selection_counts(numel: int, sparsify: str, density: float, gamma: float) -> tuple[int, int]:
    """(lo, hi): a magnitude/outliers expert keeps the first hi minus the first lo elements of its
    stable magnitude order (descending for magnitude, ascending for outliers), as the references do."""
    if density >= 1:
        return 0, numel
    if sparsify == "magnitude":
        return 0, 0 if density <= 0 or numel == 0 else sp.topk_count(numel, density)
    return sp.outlier_window(numel, density, gamma)


def _merge_with(backend, base, experts, weights, densities, sparsify="", consensus=False, normalize=False,
                rescale=False, lambda_=1.0, gammas=None, epsilons=None, seed=0, tensor_name="", out=None):
    """Run merge_task_vectors on a compiled backend (a module with the csrc/cpu/bindings.cpp functions),
    or on the reference when there is none or the inputs are not ones it serves; into out if the
    backend takes one (the CPU kernel does), else into a fresh tensor."""
    args = (base, experts, weights, densities, sparsify, consensus, normalize, rescale, lambda_, gammas, epsilons,
            seed, tensor_name)
    codes = sp.SPARSIFY_CODES
    if (backend is None or not experts or not backends.served_by_kernels(base, *experts) or sparsify not in codes
            or len(experts) > getattr(backend, "max_experts", len(experts))
            or codes[sparsify] not in getattr(backend, "modes", codes.values())
            or sparsify == "rank" and base.dim() > 2):  # the kernels rank whole rows; dim 1 there is not one
        return merge_task_vectors_reference(*args)
    check_merge_arguments(base, experts, weights, densities, sparsify, gammas, epsilons, lambda_)
    epsilons = [0.0] * len(experts) if sparsify == "rank" and epsilons is None else epsilons  # as the reference
    n = base.numel()
    counts = [selection_counts(n, sparsify, d, gammas[i] if gammas else 0.0) for i, d in enumerate(densities)]
    if sparsify == "rank":
        for d, e in zip(densities, epsilons):
            sp.check_della(d, e)
    key0, key1 = philox_key(seed, tensor_name)
    out = kernel_out("merge_task_vectors", out, base, [base, *experts])
    return backend.merge_task_vectors(base, list(experts), list(weights), codes[sparsify], [c[0] for c in counts],
                                      [c[1] for c in counts], list(densities), list(epsilons or []), consensus,
                                      normalize, rescale, lambda_, key0, key1, *([out] if out is not None else []))


@merge_task_vectors.register_kernel("cpu")
def _merge_task_vectors_cpu(base, experts, *args, out=None, **kwargs):
    return _merge_with(backends.cpu_extension(), base, experts, *args, out=out, **kwargs)


@merge_task_vectors.register_kernel("cuda")
def _merge_task_vectors_cuda(base, experts, *args, out=None, **kwargs):
    # the GPU kernels allocate their result; the out overload copies it into out
    return _merge_with(backends.gpu_backend(), base, experts, *args, **kwargs)
