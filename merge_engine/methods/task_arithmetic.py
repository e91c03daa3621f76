"""The generalized task-arithmetic family: sparsify each task vector, weight, optionally elect signs
and take the disjoint mean, scale by lambda, add to the base (mergekit's GTA methods). Also the other
task-vector merges of mergekit 0.1.5: sce, ram, ramplus_tl and arcee_fusion (ops/selective.py)."""
from __future__ import annotations

import torch

from merge_engine import ops
from merge_engine.methods.base import MergeMethod, TensorGroup
from merge_engine.ops.sparsify import check_della
from merge_engine.parameters import ParamSpec, Scope, at_least_zero_for_bernoulli, density_outside, fraction_outside

# name: (sparsification, sign consensus, normalize default, rescale default, reference)
FAMILY = {
    "task_arithmetic": ("", False, False, False, "https://arxiv.org/abs/2212.04089"),
    "ties": ("magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("outliers", False, False, False, "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("outliers", True, False, False, "https://arxiv.org/abs/2312.06795"),
    "della": ("rank", True, True, True, "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("rank", False, False, True, "https://arxiv.org/abs/2406.11617"),
}


def _merge(sparsify: str, consensus: bool, group: TensorGroup) -> torch.Tensor:
    p = group.shared
    return ops.merge_task_vectors(
        group.base, group.experts, group.values("weight"),
        group.values("density"), sparsify, consensus, p["normalize"], p["rescale"], p["lambda"],
        group.values("gamma") if sparsify == "outliers" else None,
        group.values("epsilon") if sparsify == "rank" else None,
        group.seed, group.name, out=group.output_like(group.base))


def _della_problem(shared: dict, per_model: list[dict], compute: torch.dtype) -> str | None:
    """DELLA's keep probabilities density +- epsilon must lie in (0, 1), for each expert of each tensor
    (a gradient or filter may give some tensors values outside): found when planning, not mid-merge."""
    for m in (m for m in per_model if "density" in m):  # the base has none
        try:
            check_della(m["density"], m["epsilon"])
        except ValueError as e:
            return str(e)
    return None


def _method(name: str) -> MergeMethod:
    sparsify, consensus, normalize, rescale, ref = FAMILY[name]
    params = [
        ParamSpec("int8_mask", bool, Scope.SHARED, False),  # memory-only in mergekit; accepted, no effect
        ParamSpec("normalize", bool, Scope.SHARED, normalize),
        ParamSpec("rescale", bool, Scope.SHARED, rescale),
        ParamSpec("lambda", float, Scope.SHARED, 1.0),
        ParamSpec("weight", float, Scope.NON_BASE),
        ParamSpec("density", float, Scope.NON_BASE, 1.0, caution=density_outside,
                  check=at_least_zero_for_bernoulli if sparsify == "random" else None),
    ]
    if sparsify == "outliers":
        params.append(ParamSpec("gamma", float, Scope.NON_BASE, 0.01, caution=fraction_outside))
    if sparsify == "rank":  # density +- epsilon must lie in (0, 1): _della_problem, per tensor
        params.append(ParamSpec("epsilon", float, Scope.NON_BASE, 0.15))
    return MergeMethod(name, lambda g: _merge(sparsify, consensus, g), tuple(params), base="required",
                       reference=ref, tensor_problem=_della_problem if sparsify == "rank" else None)


METHODS = [_method(name) for name in FAMILY]


def _sce(group: TensorGroup) -> torch.Tensor:
    return ops.sce_merge(group.base, group.experts, group.shared["select_topk"])


def _ram(group: TensorGroup) -> torch.Tensor:
    return ops.ram_merge(group.base, group.experts, group.shared["epsilon"])


def _ramplus_tl(group: TensorGroup) -> torch.Tensor:
    p = group.shared
    return ops.ramplus_tl_merge(group.base, group.experts, p["r"], p["alpha"], p["epsilon"])


def _arcee_fusion(group: TensorGroup) -> torch.Tensor:
    return ops.arcee_fusion(group.base, group.tensors[1 - group.base_index])


def _with_fp32(compute: torch.dtype) -> torch.dtype:
    """mergekit's ramplus_tl and arcee_fusion multiply by an fp32 tensor: half-precision merges come out fp32."""
    return torch.promote_types(compute, torch.float32)


RAM_EPSILON = ParamSpec("epsilon", float, Scope.SHARED, 1e-5)
RAM_REF = "https://arxiv.org/abs/2601.13572"

METHODS += [
    # per-model `weight` is not a parameter of sce (mergekit ignores it; config validation warns)
    MergeMethod("sce", _sce, (ParamSpec("int8_mask", bool, Scope.SHARED, False),  # memory-only in mergekit
                              ParamSpec("select_topk", float, Scope.SHARED, 1.0)),
                base="required", reference="https://arxiv.org/abs/2408.07990"),
    MergeMethod("ram", _ram, (RAM_EPSILON,), base="required", reference=RAM_REF),
    MergeMethod("ramplus_tl", _ramplus_tl, (ParamSpec("r", float, Scope.SHARED, 0.1),
                                            ParamSpec("alpha", float, Scope.SHARED, 0.2), RAM_EPSILON),
                base="required", reference=RAM_REF, result_dtype=_with_fp32),
    MergeMethod("arcee_fusion", _arcee_fusion, (), base="required", min_inputs=2, max_inputs=2,
                reference="https://arcee.ai", result_dtype=_with_fp32),
]
