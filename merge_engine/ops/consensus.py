"""Sign election and the disjoint weighted mean: the TIES family (task_arithmetic, ties, dare_*,
breadcrumbs*, della*) in one call. Pure-PyTorch references mirroring mergekit 0.1.5's arithmetic
order exactly, so that outputs are bit-identical to mergekit's where the method is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch

from merge_engine.ops import sparsify as sp


@torch.library.custom_op("merge_engine::elect_sign", mutates_args=())
def elect_sign(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES "sum" election over dim 0: +1 where the sum of weighted deltas is >= 0 (a zero sum
    elects +1), else -1; in the deltas' dtype."""
    return (weighted_deltas.sum(dim=0) >= 0).to(weighted_deltas.dtype) * 2 - 1


@torch.library.custom_op("merge_engine::disjoint_mean", mutates_args=())
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


@torch.library.custom_op("merge_engine::merge_task_vectors", mutates_args=())
def merge_task_vectors(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
                       densities: list[float], sparsify: str = "", consensus: bool = False,
                       normalize: bool = False, rescale: bool = False, lambda_: float = 1.0,
                       gammas: Optional[list[float]] = None, epsilons: Optional[list[float]] = None, seed: int = 0,
                       tensor_name: str = "") -> torch.Tensor:
    """base + lambda * mix(sparsify(expert_i - base) * w_i), in the base's dtype.

    sparsify: "" (none), "magnitude" (TIES), "random" (DARE), "outliers" (breadcrumbs), "rank" (DELLA);
    each expert is sparsified on its own, before weighting. consensus: TIES sum-sign election and the
    disjoint mean; without it the plain weighted sum, divided by sum(w) if normalize (|sum(w)| < 1e-8 -> 1).
    Random sparsifiers draw from Philox keyed by (seed, tensor_name, expert index).
    """
    if not experts:
        return base.clone()
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
