"""Closed-form least-squares merges of one linear layer from its experts' input Grams.

A linear layer W [out, in] of expert t was trained on inputs X_t; its Gram is G_t = X_t^T X_t [in, in].

- RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023):
  W* = argmin_W sum_t ||X_t W^T - X_t W_t^T||^2 = (sum_t W_t G~_t)(sum_t G~_t)^-1, where G~ keeps the
  diagonal and scales the off-diagonal entries by alpha (the paper's 0.9 shrinks towards the diagonal,
  which regularises and keeps the sum invertible).
- Bayesian Model Merging, inner level (Li et al., arXiv 2605.12843): the MAP of the same regression
  under the Gaussian prior W ~ N(W_anchor, I / lam) centred on an anchor merge,
  W* = (sum_t W_t G_t + lam W_anchor)(sum_t G_t + lam I)^-1. lam -> 0 gives RegMean with alpha = 1,
  lam -> inf the anchor.

Both are solved as S W*^T = R^T with S symmetric positive semi-definite, by a Cholesky factorisation
(never an explicit inverse). A singular S (a Gram of fewer tokens than features, a dead input feature)
gets a diagonal jitter that starts at 1e-10 of its mean diagonal and grows tenfold until the
factorisation succeeds, so the answer is always finite; the jitter used is logged. The solve runs in
float64 by default: activation Grams have condition numbers far beyond fp32's 1e7.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("merge_engine")

JITTER_START = 1e-10  # relative to the mean diagonal
JITTER_TRIES = 12


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): RegMean's G~."""
    if alpha == 1.0:
        return gram
    return gram * alpha + torch.diag_embed(torch.diagonal(gram) * (1.0 - alpha))


def cholesky_with_jitter(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(L, jitter) with L L^T = matrix + jitter * mean(diag) * I; jitter 0 when the matrix is positive definite."""
    scale = float(torch.diagonal(matrix).abs().mean()) or 1.0
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for jitter in (0.0, *(JITTER_START * 10.0 ** i for i in range(JITTER_TRIES))):
        factor, info = torch.linalg.cholesky_ex(matrix + eye * (jitter * scale) if jitter else matrix)
        if int(info) == 0 and torch.isfinite(factor).all():
            if jitter:
                log.info("Gram system needed a diagonal jitter of %.1e x its mean diagonal", jitter)
            return factor, jitter
    raise ValueError("the Gram system is not positive semi-definite even after a diagonal jitter of "
                     f"{jitter:.0e} x its mean diagonal (a NaN or Inf in a Gram?)")


def solve_normal_equations(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """W* with W* system = rhs ([out, in] x [in, in]), system symmetric PSD, by Cholesky."""
    factor, _ = cholesky_with_jitter(system)
    return torch.cholesky_solve(rhs.T, factor).T


def _check(weights: list[torch.Tensor], grams: list[torch.Tensor]) -> None:
    if not weights or len(weights) != len(grams):
        raise ValueError(f"need one Gram per weight, got {len(weights)} weights and {len(grams)} Grams")
    out, d = weights[0].shape
    for t, (w, g) in enumerate(zip(weights, grams)):
        if w.shape != (out, d) or g.shape != (d, d):
            raise ValueError(f"model {t}: weight {list(w.shape)} and Gram {list(g.shape)} do not match "
                             f"weight {[out, d]} and Gram {[d, d]}")


def regmean(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float = 0.9,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(sum_t W_t G~_t)(sum_t G~_t)^-1 in `dtype`, returned in the weights' dtype."""
    _check(weights, grams)
    system = rhs = None
    for w, g in zip(weights, grams):
        g = shrink_off_diagonal(g.to(dtype), alpha)
        term = w.to(dtype) @ g
        system, rhs = (g, term) if system is None else (system + g, rhs + term)
    return solve_normal_equations(system, rhs).to(weights[0].dtype)


def bmm(weights: list[torch.Tensor], grams: list[torch.Tensor], anchor: torch.Tensor, lam: float,
        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(sum_t W_t G_t + lam W_anchor)(sum_t G_t + lam I)^-1 in `dtype`, returned in the weights' dtype."""
    _check(weights, grams)
    if not lam >= 0 or lam == float("inf"):
        raise ValueError(f"lambda must be finite and >= 0, got {lam}")
    system = torch.eye(anchor.shape[1], dtype=dtype, device=anchor.device) * lam
    rhs = anchor.to(dtype) * lam
    for w, g in zip(weights, grams):
        system = system + g.to(dtype)
        rhs = rhs + w.to(dtype) @ g.to(dtype)
    return solve_normal_equations(system, rhs).to(weights[0].dtype)


def task_vector_gram(expert: torch.Tensor, base: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Data-free Gram estimate of BMM: U^T U for the task vector U = W - W_base [out, in], scaled to a mean
    eigenvalue of 1 (trace d), the scale `gram_scale: trace` gives measured Grams. Rows of U span the
    directions the fine-tuning moved the layer along, which are the directions its inputs occupy (the
    paper's alignment of activation statistics and task vectors). A zero task vector gives zero."""
    u = expert.to(dtype) - base.to(dtype)
    return unit_mean_eigenvalue(u.T @ u)


def unit_mean_eigenvalue(gram: torch.Tensor) -> torch.Tensor:
    """gram scaled to trace d (mean eigenvalue 1); a zero Gram stays zero."""
    trace = float(torch.trace(gram))
    return gram * (gram.shape[0] / trace) if trace > 0 else gram
