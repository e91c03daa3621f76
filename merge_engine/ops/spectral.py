"""SVD-based merges of task vectors D_t = W_t - W_base (t = 1..T): TSV-Merge and ISO-C.

TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025, arXiv 2412.00081): keep the top k singular triplets of each D_t, concatenate them
(U = [U_1 .. U_T], S = diag(S_1 .. S_T), V = [V_1 .. V_T]), replace U and V by their nearest
matrices with orthonormal columns (orthogonal Procrustes: P Q^T for the thin SVD P Sigma Q^T), and
return W_base + alpha * U_perp S V_perp^T.

ISO-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025, arXiv 2502.04959): D = sum_t D_t = U S V^T; return
W_base + alpha * mean(S) * U V^T, the task-arithmetic sum with a flat spectrum.

Conventions, as in the papers' code (AntoAndGar/task_singular_vectors, danielm1405/iso-merging):
- Tensors that are not 2-D matrices get W_base + alpha * mean_t(D_t) (both repos average them);
  callers may send 2-D tensors this way too (the repos do so for CLIP's text_projection, LLM ports
  for embeddings), see mean_task_arithmetic.
- k = max(1, int(rank_fraction * r)) with r = min(m, n); rank_fraction None means 1/T, taken as
  r // T in integers (int(r * (1/T)) can round down a whole component). k is capped at r // T so
  the T k concatenated columns can be orthonormal; where T > r not even one can, and the matrix
  falls back to the mean.
- Computation in fp32 (fp64 for fp64 inputs) whatever the storage dtype; output in the inputs' dtype.

Edge cases the papers leave open:
- A task's singular vectors for (numerically) zero singular values are arbitrary, and Procrustes
  would let them rotate the other tasks' vectors. TSV keeps only components above the numerical
  rank tolerance of their D_t (s > s_max * max(m, n) * eps, numpy's matrix_rank default), so an
  all-zero task vector contributes nothing and all-zero inputs return the base.
- Where tasks share singular directions exactly (two identical experts), the concatenated U or V
  is rank-deficient and its polar factor, hence the TSV result, is not unique (LAPACK decides).
- ISO-C gives every one of the r directions the mean singular value, including directions where
  D is rank-deficient; there U V^T is not unique (LAPACK decides), as in the paper's code.
"""
from __future__ import annotations

import math

import torch

from merge_engine.ops.library import op


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_args(op: str, base: torch.Tensor, experts: list[torch.Tensor], alpha: float) -> None:
    if not experts:
        raise ValueError(f"{op}: needs at least one expert")
    for j, e in enumerate(experts):
        if e.shape != base.shape or e.dtype != base.dtype or e.device != base.device:
            raise ValueError(f"{op}: expert {j} is {e.dtype} {list(e.shape)} on {e.device}, the base "
                             f"{base.dtype} {list(base.shape)} on {base.device}")
    if not math.isfinite(alpha):
        raise ValueError(f"{op}: alpha must be finite, got {alpha}")


def _task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    b = base.to(compute_dtype(base))
    return b, [e.to(b.dtype) - b for e in experts]


def _is_matrix(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.numel() > 0


def mean_task_arithmetic(base: torch.Tensor, experts: list[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """W_base + alpha * mean_t(W_t - W_base), in fp32 (fp64 for fp64): both methods' non-SVD path."""
    check_args("mean_task_arithmetic", base, experts, alpha)
    b, deltas = _task_vectors(base, experts)
    return (b + alpha * (sum(deltas) / len(deltas))).to(base.dtype)


def tsv_rank(r: int, tasks: int, rank_fraction: float | None) -> int:
    """Components kept per task for a matrix of rank bound r; 0 when T > r (no orthonormal room)."""
    k = r // tasks if rank_fraction is None else max(1, int(rank_fraction * r))
    return min(k, r // tasks)


def top_components(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top k singular triplets (U_k, S_k, V_k^T) of d, less those below its numerical rank."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    keep = s[:k] > s[0] * max(d.shape) * torch.finfo(d.dtype).eps
    return u[:, :k][:, keep], s[:k][keep], vh[:k][keep]


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal Procrustes solution: P Q^T for the thin SVD x = P Sigma Q^T."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_factors(deltas: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_perp, S, V_perp^T) of TSV-Merge: U_perp and V_perp have orthonormal columns."""
    parts = [top_components(d, k) for d in deltas]
    u = torch.cat([p[0] for p in parts], dim=1)
    vh = torch.cat([p[2] for p in parts], dim=0)
    return polar(u), torch.cat([p[1] for p in parts]), polar(vh)


def check_rank_fraction(rank_fraction: float | None) -> None:
    if rank_fraction is not None and not 0 < rank_fraction <= 1:
        raise ValueError(f"tsv_merge: rank_fraction must be in (0, 1], got {rank_fraction}")


@op("tsv_merge", floating=("base", "experts"))
def tsv_merge(base: torch.Tensor, experts: list[torch.Tensor], rank_fraction: float | None = None,
              alpha: float = 1.0) -> torch.Tensor:
    """TSV-Merge of T experts onto base (see the module docstring); rank_fraction None means 1/T."""
    check_args("tsv_merge", base, experts, alpha)
    check_rank_fraction(rank_fraction)
    k = tsv_rank(min(base.shape), len(experts), rank_fraction) if _is_matrix(base) else 0
    if k == 0:
        return mean_task_arithmetic(base, experts, alpha)
    b, deltas = _task_vectors(base, experts)
    u, s, vh = tsv_factors(deltas, k)
    return (b + alpha * ((u * s) @ vh)).to(base.dtype)


@op("iso_c", floating=("base", "experts"))
def iso_c(base: torch.Tensor, experts: list[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """ISO-C of T experts onto base: W_base + alpha * mean(S) U V^T for sum_t D_t = U S V^T."""
    check_args("iso_c", base, experts, alpha)
    if not _is_matrix(base):
        return mean_task_arithmetic(base, experts, alpha)
    b, deltas = _task_vectors(base, experts)
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    return (b + (alpha * s.mean()) * (u @ vh)).to(base.dtype)


@tsv_merge.register_fake
def _(base, experts, rank_fraction=None, alpha=1.0):
    return torch.empty_like(base)


@iso_c.register_fake
def _(base, experts, alpha=1.0):
    return torch.empty_like(base)
