"""Per-tensor sparsification of task vectors: magnitude trim (TIES), random drop (DARE), outlier
window (breadcrumbs) and rank-dependent drop (DELLA). Pure-PyTorch references; their outputs are
the specification for the compiled kernels.

Tie rule for every magnitude ordering: a stable sort, i.e. among equal |x| the lower flat index comes
first, in descending (TIES top-k) and ascending (breadcrumbs window) orders alike; see ops/select.py.
mergekit calls an unstable argsort, so at exact ties on the cut-off its choice is arbitrary; ours is
documented and reproducible on every backend.
"""
from __future__ import annotations

import math

import torch

from merge_engine.ops.library import op
from merge_engine.ops.random import philox_key, uniform
from merge_engine.ops.select import cutoff_mask, magnitude_cutoff

RESCALE_EPS = 1e-7


def l1_rescale_factor(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
    """mergekit's rescale factor, |x|_1 / |kept|_1 in x's dtype (torch's sums), or None when either is tiny."""
    before, after = x.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return before / after


def rescale_l1(x: torch.Tensor, kept: torch.Tensor, drawn: bool = False) -> torch.Tensor:
    """mergekit's rescale: scale the kept part so its L1 norm matches the original's, in x's dtype, as
    mergekit computes it, but for fp16 in fp32 where rescale_in_fp32 says (drawn: a random mask)."""
    if rescale_in_fp32(x, kept, drawn):
        factor = l1_rescale_factor(x.float(), kept.float())
        return kept if factor is None else (kept.float() * factor).to(x.dtype)
    factor = l1_rescale_factor(x, kept)
    return kept if factor is None else kept * factor


def rescale_in_fp32(x: torch.Tensor, kept: torch.Tensor, drawn: bool) -> bool:
    """Whether an fp16 tensor's rescale (norms, factor, scaled values) is computed in fp32: for a random
    mask (DARE, DELLA) always, as mergekit works in fp32 there (on the CPU, which has no fp16 Bernoulli
    draws); for a cut-off mask (TIES, breadcrumbs), which mergekit rescales in fp16, only where an fp16
    norm overflows (a sum of |delta| past 65504, where mergekit's factor and every kept value become Inf or NaN)."""
    if x.dtype != torch.float16:
        return False
    return drawn or not (bool(torch.isfinite(x.abs().sum())) and bool(torch.isfinite(kept.abs().sum())))


def _apply(x: torch.Tensor, keep: torch.Tensor, rescale: bool, drawn: bool = False) -> torch.Tensor:
    kept = x * keep.to(x.dtype)  # multiply (not where) to keep mergekit's signed zeros
    return rescale_l1(x, kept, drawn) if rescale else kept


def check_finite_values(op_name: str, **values: float) -> None:
    """ValueError naming each non-finite value (NaN compares false with every bound: it would pass as keep-all,
    drop-all or an int() error by turns)."""
    bad = [f"{name} = {v}" for name, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{op_name}: {', '.join(bad)}: must be finite")


def topk_count(numel: int, density: float) -> int:
    """How many elements TIES keeps: max(1, int(density * numel)) for 0 < density < 1."""
    return max(1, int(density * numel))


@op("magnitude_topk_mask", fake=lambda x, k: torch.empty(x.shape, dtype=torch.bool, device=x.device))
def magnitude_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |x| over the whole tensor (ties: lower index first)."""
    return cutoff_mask(x, magnitude_cutoff(x, k, True), True)


@op("trim_by_magnitude", fake="x", floating=("x",))
def trim_by_magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: keep the top max(1, int(density*numel)) magnitudes of the whole tensor, zero the rest."""
    check_finite_values("trim_by_magnitude", density=density)
    if density >= 1:
        return x.clone()
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    return _apply(x, magnitude_topk_mask(x, topk_count(x.numel(), density)), rescale)


@op("drop_random", fake="x", floating=("x",))
def drop_random(x: torch.Tensor, density: float, seed: int, tensor_name: str, stream: int,
                rescale: bool = True) -> torch.Tensor:
    """DARE: keep each element with probability density, zero the rest; rescale: scale the kept part so its L1
    norm is x's (mergekit's rescale). The uniforms come from Philox4x32-10 keyed by (seed, tensor_name) and
    counted by (element index, stream): stream tells apart the experts of one tensor, so the same arguments
    give the same mask on every device and backend."""
    check_finite_values("drop_random", density=density)
    if density >= 1:
        return x.clone()
    u = uniform(x.numel(), philox_key(seed, tensor_name), stream, x.device).reshape(x.shape)
    return _apply(x, u < torch.tensor(density, dtype=torch.float32), rescale, drawn=True)


@op("trim_outliers", fake="x", floating=("x",))
def trim_outliers(x: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma*N) largest magnitudes, then the smallest, keeping int(density*N)."""
    check_finite_values("trim_outliers", density=density, gamma=gamma)
    if density >= 1:
        return x.clone()
    lo, hi = outlier_window(x.numel(), density, gamma)
    # positions [lo, hi) of the ascending order: the first hi minus the first lo
    keep = cutoff_mask(x, magnitude_cutoff(x, hi, False), False)
    keep &= ~cutoff_mask(x, magnitude_cutoff(x, lo, False), False)
    return _apply(x, keep, rescale)


def outlier_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """[lo, hi): the positions of the ascending magnitude order breadcrumbs keeps. mergekit keeps
    argsort[n_bot:n_bot + target] (n_bot = max(0, N - target - int(gamma N)), target = int(density N)), a
    Python slice: with density < 0 and gamma > 1 its end is negative and counts from the back."""
    target = int(density * numel)
    n_bot = max(0, numel - target - int(gamma * numel))
    kept = range(numel)[n_bot:n_bot + target]
    return kept.start, max(kept.start, kept.stop)


def della_keep_probability(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's per-element keep probability from the rank of |x| along dim 1, in fp32 (as mergekit computes it
    for fp32 and fp16 on the CPU; for bf16, and on a GPU, mergekit rounds the ranks to the tensor's dtype).

    p = (density - eps) + 2 eps (rank - 1) / (ncols - 1), rank 1 being the smallest magnitude of its row
    (ncols = x.shape[1]); a 1-D tensor is one row, and in a tensor of 3 or more dims each x[i, :, k, ...] is
    one; a one-column row gets density - eps (mergekit's clamp of 0/0).
    """
    rows = x.detach().reshape(1, -1) if x.dim() < 2 else x.detach()
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ncols = rows.shape[1]
    positions = torch.arange(ncols, device=x.device).view(1, ncols, *[1] * (rows.dim() - 2)).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    # over a 0-d tensor on x's device: CUDA divides by a Python number as a multiply by its reciprocal, which
    # differs from the CPU's (and the kernels') true division in the last bit
    rank_norm = rank.to(torch.float32) / torch.tensor(float(max(ncols - 1, 1)), dtype=torch.float32, device=x.device)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(x.shape)


def check_della(density: float, epsilon: float) -> None:
    """DELLA's probabilities must stay inside (0, 1) (checked only when 0 < density < 1)."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1 "
                         f"(density={density}, epsilon={epsilon})")


@op("drop_by_rank", fake="x", floating=("x",))
def drop_by_rank(x: torch.Tensor, density: float, epsilon: float, seed: int, tensor_name: str,
                 stream: int, rescale: bool = True) -> torch.Tensor:
    """DELLA MagPrune: keep each element with probability (density - epsilon) + 2 epsilon (rank - 1) / (ncols - 1),
    rank 1 being the smallest magnitude of its row (della_keep_probability), zero the rest; rescale: scale the
    kept part so its L1 norm is x's. 0 < density -+ epsilon < 1 is required when 0 < density < 1. The uniforms
    come from Philox keyed by (seed, tensor_name) and counted by (element index, stream), as drop_random's."""
    check_finite_values("drop_by_rank", density=density, epsilon=epsilon)
    if density >= 1:
        return x.clone()
    if density <= 0 or not x.numel():
        return torch.zeros_like(x)
    check_della(density, epsilon)
    p = della_keep_probability(x, density, epsilon)
    u = uniform(x.numel(), philox_key(seed, tensor_name), stream, x.device).reshape(x.shape)
    return _apply(x, u < p, rescale, drawn=True)


# sparsify= of merge_task_vectors -> the mode code the kernels take (csrc/task_vectors.h's enum Mode and
# triton_kernels/task_vectors.py use these values; tests/ops/test_sparsify.py checks both)
SPARSIFY_CODES = {"": 0, "magnitude": 1, "random": 2, "outliers": 3, "rank": 4}
SPARSIFIERS = tuple(name for name in SPARSIFY_CODES if name)
