"""Task-vector merges that weight or select entries by how the experts agree or differ: SCE, RAM,
RAM+ (tensor-local) and Arcee Fusion. Pure-PyTorch references that follow mergekit 0.1.5's
arithmetic order exactly (bit-identical on the same device), in the inputs' dtype unless noted.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from merge_engine.ops.consensus import elect_sign
from merge_engine.ops.library import op, promoted

QUANTILE_SAMPLE_SIZE = 1_000_000  # above this, mergekit's arcee_fusion estimates quantiles from a sample


def _task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    for i, x in enumerate(experts):
        if x.shape != base.shape:
            raise ValueError(f"expert {i} has shape {list(x.shape)} but the base has {list(base.shape)}")
    return torch.stack([x - base for x in experts], dim=0)


def sce_select_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's select step: 1 at the int(fraction * nonzero) positions whose variance across the task
    vectors (dim 0, population variance) is largest, else 0; nonzero counts the positions of non-zero
    variance. Ties are broken as torch.topk breaks them (as in mergekit). In the task vectors' dtype.
    The k positions are asked for unsorted: the same set (torch orders them only after choosing), and a GPU
    sorts at most 2**31 - 1 values in one dimension, which k passes in a large fused MoE tensor."""
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    if fraction >= 1:
        return torch.ones_like(task_vectors[0])
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var).float() * fraction)  # in fp32 as mergekit's (torch's default dtype: not the caller's)
    mask = torch.zeros_like(var)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True, sorted=False).indices] = 1
    return mask


def sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """SCE's calculate step: each task vector's mean square over the sum of them (1/K each when that
    sum is below 1e-6)."""
    w = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


@op("sce_merge", fake=promoted("base", "experts"), floating=("base", "experts"))
def sce_merge(base: torch.Tensor, experts: list[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE (Select, Calculate, Erase) of the task vectors tau_i = x_i - base:
    1. if select_topk < 1, zero every position outside the top select_topk fraction by variance across
       the task vectors (sce_select_mask);
    2. w_i = mean(tau_i^2) / sum_j mean(tau_j^2) (sce_weights), one scalar per expert;
    3. erase: keep tau_i where its sign agrees with the sign of sum_j tau_j (TIES sum election, a zero
       sum elects +; zeros never agree);
    result = base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6). No experts: the base."""
    if not math.isfinite(select_topk):
        raise ValueError(f"sce_merge: select_topk = {select_topk}: must be finite")
    if not experts:
        return base.clone()
    tvs = _task_vectors(base, experts)
    if select_topk < 1:
        tvs = tvs * sce_select_mask(tvs, select_topk).unsqueeze(0)
    agree = tvs.sign() == elect_sign(tvs)
    w = sce_weights(tvs)
    w = w.reshape(-1, *([1] * (tvs.dim() - 1)))
    erased = w * agree
    return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def _ram_masks(base: torch.Tensor, experts: list[torch.Tensor], epsilon: float):
    """(flat task vectors with inactive entries zeroed, active mask, active counts per entry, overlap mask,
    unique mask): an entry of tau_i is active where |tau_i| > epsilon."""
    tvs = _task_vectors(base, experts).reshape(len(experts), -1)  # a stack keeps its inputs' memory format
    active = tvs.abs() > epsilon
    counts = active.sum(dim=0, keepdim=True)
    return tvs * active, active, counts, counts > 1, counts == 1


@op("ram_merge", fake=promoted("base", "experts"), floating=("base", "experts"))
def ram_merge(base: torch.Tensor, experts: list[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """RAM (Reinforced Agent Merging): base + a task-vector sum in which an entry active (|tau_i| > epsilon)
    in one expert only is taken as is, and an entry active in several is averaged over those experts.
    Inactive entries count as zero. No experts: the base."""
    if not experts:
        return base.clone()
    tvs, _, counts, overlap, unique = _ram_masks(base, experts, epsilon)
    merged = ((tvs * unique) + (tvs * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@op("ramplus_tl_merge", fake=promoted("base", "experts", at_least=torch.float32), floating=("base", "experts"))
def ramplus_tl_merge(base: torch.Tensor, experts: list[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
                     epsilon: float = 1e-5) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with each expert's unique entries scaled by 1 + r * clamp(rho_i, 0, alpha),
    rho_i = (its active entries shared with another expert) / (its active unique entries, floored at
    epsilon), counted over this tensor. The scale is fp32 (as in mergekit), so bf16/fp16 inputs give an
    fp32 result; fp64 stays fp64. No experts: the base. With epsilon 0, an expert with no active entry (equal to
    the base) has the scale 0/0, and the result is NaN everywhere, as mergekit's."""
    if not experts:
        return base.clone()
    tvs, active, counts, overlap, unique = _ram_masks(base, experts, epsilon)
    shared = (active & overlap).sum(dim=1)
    alone = (active & unique).sum(dim=1)
    # counts are integers: their ratio in fp32 explicitly (true division would take torch's default dtype)
    scale = 1 + r * (shared.float() / alone.float().clamp(min=epsilon)).clamp(min=0, max=alpha)
    merged = ((tvs * unique * scale.unsqueeze(-1)) + (tvs * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance: |other - base| times KL(softmax(other) || softmax(base)) taken along
    the last dim (one KL per row, 1e-8 added to both distributions)."""
    diff = (other - base).abs()
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1) of the importance scores, each quantile q being the element at sorted index
    int(q (n - 1)) (no interpolation), as mergekit computes it.

    Up to QUANTILE_SAMPLE_SIZE elements this is mergekit's computation (a sort of every score). Above it,
    mergekit sorts a sample of 1e6 scores drawn with replacement by torch.randint from the global RNG, so
    its threshold depends on the RNG state (the seed and every random draw made before, in its execution
    order) and is only an estimate. We take the exact quantiles of all the scores instead, with
    torch.kthvalue (linear time, no full sort): deterministic, the value mergekit's sample estimates, and
    the same definition as below the limit. There the mask may differ from any one mergekit run in the
    few elements whose score lies between the exact and the sampled threshold."""
    flat = importance.reshape(-1)
    n = flat.numel()
    if n == 0:  # no scores, no quantiles: a threshold nothing is compared with
        return flat.new_zeros(())
    if n <= QUANTILE_SAMPLE_SIZE:
        ranks = (torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32) * (n - 1)).long().tolist()  # (as above)
        ordered = torch.sort(flat).values
        q1, median, q3 = (ordered[i] for i in ranks)
    else:
        q1, median, q3 = (torch.kthvalue(flat, int(q * (n - 1)) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


@op("arcee_fusion", fake=promoted("base", "other", at_least=torch.float32), floating=("base", "other"))
def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion: base + (other - base) where the importance (fusion_importance) is at least the
    threshold median + 1.5 IQR (fusion_threshold), base elsewhere. The mask is fp32 (as in mergekit),
    so bf16/fp16 inputs give an fp32 result; fp64 stays fp64."""
    if other.shape != base.shape:
        raise ValueError(f"arcee_fusion: shapes {list(other.shape)} and {list(base.shape)} differ")
    importance = fusion_importance(base, other)
    mask = (importance >= fusion_threshold(importance)).float()
    return base + (other - base) * mask
