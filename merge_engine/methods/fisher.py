"""Fisher-weighted merging, and task arithmetic and TIES with Fisher as the importance score.

Each weighted model names the folder of its diagonal Fisher (written by `merge-engine fisher`, same
tensor names as the model) with `fisher: PATH` beside `model:` in the config.

fisher (Matena and Raffel 2021, arXiv 2111.09832): theta = sum_j c_j F'_j theta_j / sum_j c_j F'_j, with
c_j the model's weight (divided by the L2 norm of its whole Fisher when normalize_fisher is set, so
Fishers estimated on different amounts of data weigh alike) and F'_j = max(F_j, fisher_floor) for
the first model only (favor_target_model, the paper's default: where no model has information the
first one wins) or for every model.

fisher_task_arithmetic / fisher_ties: as task_arithmetic / ties, but each task vector keeps the
top-density fraction of its elements ranked by Fisher (importance: fisher) or by the Fisher-weighted
squared change F * delta^2 (importance: saliency, the second-order estimate of the loss change that
dropping the element causes) instead of by |delta|. Same tie rule as TIES (ops/select.py).

A tensor whose Fisher is absent from some model's folder (missing_fisher: fallback, the default) is
merged without Fishers: the weighted average for fisher, magnitude trimming for that model's task
vector in the importance variants; missing_fisher: error refuses such a config before reading any data.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

from merge_engine import ops
from merge_engine.io import fishers
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.safetensors_format import folder_identity
from merge_engine.methods.base import MergeMethod, TensorGroup
from merge_engine.ops.fisher import check_fisher_values
from merge_engine.ops.select import cutoff_mask, magnitude_cutoff
from merge_engine.ops.sparsify import topk_count
from merge_engine.parameters import ParamSpec, Scope, in_unit_interval, non_negative, one_of

log = logging.getLogger("merge_engine")

REFERENCE = "https://arxiv.org/abs/2111.09832"
MISSING = ParamSpec("missing_fisher", str, Scope.SHARED, "fallback", check=one_of("fallback", "error"))


def fisher_l2_norm(folder: str) -> float:
    """The L2 norm of a whole Fisher: from the sum_squares of its manifest, else by reading it once (again once
    the folder's files are rewritten)."""
    return _fisher_l2_norm(folder, folder_identity(folder))


@functools.cache
def _fisher_l2_norm(folder: str, identity: tuple) -> float:
    if fishers.has_manifest(folder):
        return math.sqrt(fishers.fisher_manifest(folder)["sum_squares"])
    log.info("%s: no %s; reading the whole Fisher once to normalise it", folder, fishers.MANIFEST_FILE)
    ckpt = Checkpoint(folder)
    return math.sqrt(sum(float(ckpt.read(name).double().square().sum()) for name in ckpt.tensors))


def _coefficients(group: TensorGroup, weights: list[float]) -> list[float]:
    if not group.shared["normalize_fisher"]:
        return weights
    norms = [fisher_l2_norm(folder) for folder in group.side_folders["fisher"]]
    for folder, norm in zip(group.side_folders["fisher"], norms):
        if norm == 0:
            raise ValueError(f"{folder}: the Fisher is zero everywhere; it cannot be normalised")
    return [w / norm for w, norm in zip(weights, norms)]


def _fisher(group: TensorGroup) -> torch.Tensor:
    p = group.shared
    weights = [m["weight"] for m in group.per_model]
    fishers = group.side["fisher"]
    if any(f is None for f in fishers):
        return ops.weighted_sum(group.tensors, weights, True, out=group.output_like(group.tensors[0]))
    if len({f.dtype for f in fishers}) > 1:
        fishers = [f.float() for f in fishers]
    floors = [p["fisher_floor"] if j == 0 or not p["favor_target_model"] else 0.0 for j in range(len(fishers))]
    return ops.fisher_merge(group.tensors, fishers, _coefficients(group, weights), floors,
                            out=group.output_like(group.tensors[0]))


def _importance(expert: torch.Tensor, base: torch.Tensor, fisher: torch.Tensor | None, kind: str) -> torch.Tensor:
    if fisher is None:
        return expert - base  # no Fisher for this tensor: rank by magnitude, as TIES does
    check_fisher_values([fisher])
    if kind == "fisher":
        return fisher
    return fisher.float() * (expert.float() - base.float()).square()


def keep_most_important(expert: torch.Tensor, base: torch.Tensor, importance: torch.Tensor,
                        density: float) -> torch.Tensor:
    """The expert where its importance is among the top max(1, int(density * n)), the base elsewhere."""
    n = expert.numel()
    if density >= 1:
        return expert
    if density <= 0 or n == 0:
        return base
    keep = cutoff_mask(importance, magnitude_cutoff(importance, topk_count(n, density), True), True)
    return torch.where(keep, expert, base)


def _ranked_by_fisher(consensus: bool, group: TensorGroup) -> torch.Tensor:
    p, base = group.shared, group.base
    kept = []
    for i, density in zip(group.non_base, group.values("density")):
        expert = group.tensors[i]
        importance = _importance(expert, base, group.side["fisher"][i], p["importance"])
        kept.append(keep_most_important(expert, base, importance, density))
    return ops.merge_task_vectors(base, kept, group.values("weight"), [1.0] * len(kept), "", consensus,
                                  p["normalize"], False, p["lambda"], out=group.output_like(base))


def _fisher_problem(shared: dict, per_model: list[dict], compute: torch.dtype) -> str | None:
    """The weights (>= 0) are the merge's divisor, with or without Fishers: all zero is found when planning."""
    return None if sum(m["weight"] for m in per_model) > 0 else "fisher needs at least one model with a weight > 0"


FISHER = MergeMethod(
    "fisher", _fisher,
    (ParamSpec("weight", float, Scope.INPUT, 1.0, check=non_negative),
     ParamSpec("fisher_floor", float, Scope.SHARED, 1e-6, check=non_negative),
     ParamSpec("favor_target_model", bool, Scope.SHARED, True),
     ParamSpec("normalize_fisher", bool, Scope.SHARED, False),
     MISSING),
    base="ignored", side_inputs=("fisher",), reference=REFERENCE, tensor_problem=_fisher_problem)


def _importance_method(name: str, consensus: bool, normalize: bool) -> MergeMethod:
    params = (
        ParamSpec("normalize", bool, Scope.SHARED, normalize),
        ParamSpec("lambda", float, Scope.SHARED, 1.0),
        ParamSpec("importance", str, Scope.SHARED, "fisher", check=one_of("fisher", "saliency")),
        ParamSpec("weight", float, Scope.NON_BASE),
        ParamSpec("density", float, Scope.NON_BASE, 1.0, check=in_unit_interval),
        MISSING,
    )
    return MergeMethod(name, functools.partial(_ranked_by_fisher, consensus), params, base="required",
                       side_inputs=("fisher",), reference=REFERENCE)


METHODS = [FISHER, _importance_method("fisher_task_arithmetic", False, False), _importance_method("fisher_ties", True, True)]
