"""SVD-based merges of the task vectors W_t - W_base: tsv (TSV-Merge) and iso_c (ISO-C).

Both take the base and T >= 1 experts, no per-model parameters (the papers have none), and shared:
- alpha: the papers' scaling coefficient (they tune it on validation data; 1.0 by default);
- svd: false sends a tensor down the non-matrix path, W_base + alpha * mean_t(W_t - W_base), which
  is what the papers' code does for vectors and for excluded matrices; a {filter, value} list picks
  tensors by name (for example embeddings, whose SVD is costly and which LLM ports skip);
- tsv only: rank_fraction in (0, 1], the fraction of min(m, n) kept per task; unset means 1/T.
The formulas, conventions and edge cases are in merge_engine/ops/spectral.py.
"""
from __future__ import annotations

import math

import torch

from merge_engine import ops
from merge_engine.methods.base import MergeMethod, TensorGroup
from merge_engine.ops.spectral import mean_task_arithmetic
from merge_engine.parameters import ParamSpec, Scope


def _finite(value: float) -> str | None:
    return None if math.isfinite(value) else "must be a finite number"


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _tsv(group: TensorGroup) -> torch.Tensor:
    p = group.shared
    if not p["svd"]:
        return mean_task_arithmetic(group.base, group.experts, p["alpha"])
    return ops.tsv_merge(group.base, group.experts, p["rank_fraction"], p["alpha"])


def _iso_c(group: TensorGroup) -> torch.Tensor:
    p = group.shared
    if not p["svd"]:
        return mean_task_arithmetic(group.base, group.experts, p["alpha"])
    return ops.iso_c(group.base, group.experts, p["alpha"])


COMMON = (ParamSpec("alpha", float, Scope.SHARED, 1.0, check=_finite), ParamSpec("svd", bool, Scope.SHARED, True))

METHODS = [
    MergeMethod("tsv", _tsv, COMMON + (ParamSpec("rank_fraction", float, Scope.SHARED, None, check=_fraction),),
                base="required", min_non_base=1, reference="https://arxiv.org/abs/2412.00081"),
    MergeMethod("iso_c", _iso_c, COMMON, base="required", min_non_base=1,
                reference="https://arxiv.org/abs/2502.04959"),
]
