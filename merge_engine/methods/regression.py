"""RegMean and Bayesian Model Merging: linear layers merged by least squares on their input Grams
(closed forms in merge_engine/ops/regression.py; Grams written by `merge-engine stats`, named per model
with `grams: PATH` beside `model:`).

Each method wraps a weight-only method of the engine, named in the global parameters:
- regmean, `fallback:` (default linear, i.e. the simple average): merges every tensor that is not a
  linear weight with a Gram for every regressed model (biases, norms, embeddings).
- bmm, `anchor:` (default task_arithmetic): the prior mean W_anchor of every linear layer, and the
  output for every other tensor.
The wrapped method's parameters are accepted as usual (per model, per slice, with filters); `weight`
defaults to 1, and one whose name collides with the outer method's (task arithmetic's `lambda`) is
renamed with the prefix `anchor_` / `fallback_`.

The regression runs over the non-base models (all inputs when there is no base), and so does a wrapped
method that takes no base (linear: the average of the experts); one that takes a base gets it. Their Grams are scaled
by `gram_scale` before the solve: `tokens` divides each by the number of input rows it summed (the mean x x^T, so every
model weighs by its activations, not by its data size; RegMean's default), `trace` to a mean eigenvalue
of 1 (BMM's default, so lambda is in units of the average activation energy per input direction and one
lambda suits every layer). bmm with `data_free: true` needs no Grams: it estimates each expert's from its
task vector (ops.regression.task_vector_gram, trace-scaled).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from merge_engine.dtypes import DTYPES
from merge_engine.errors import MergeEngineError
from merge_engine.io.grams import as_matrix, gram_folder, gram_problem
from merge_engine.methods.base import MergeMethod, TensorGroup
from merge_engine.ops import regression
from merge_engine.parameters import ParamSpec, Scope, in_unit_interval, non_negative, one_of

SOLVE_DTYPES = ("float64", "float32")


def solve_dtype(group: TensorGroup) -> torch.dtype:
    return DTYPES[group.shared["solve_dtype"]]


# ---- Grams of one tensor group ----

def _scaled_gram(group: TensorGroup, i: int) -> tuple[torch.Tensor, bool] | None:
    """Model i's Gram for this tensor as an [in, in] matrix in the solve dtype, scaled by gram_scale, and whether its
    weight is stored transposed; None when it has none."""
    stored = group.side["grams"][i]
    if stored is None:
        return None
    folder = gram_folder(group.side_folders["grams"][i])
    entry = folder.module_of(group.input_names[i])  # the input's own name, as the plan found its Gram
    gram = as_matrix(stored, entry["in_features"])
    problem = gram_problem(gram)
    if problem:
        raise MergeEngineError(f"{folder.path}: the Gram '{entry['gram']}' of '{group.input_names[i]}' {problem}")
    gram = gram.to(solve_dtype(group))
    if group.shared["gram_scale"] == "tokens":
        gram = gram / entry["rows"]
    else:
        gram = regression.unit_mean_eigenvalue(gram)
    return gram, entry["transposed"]


def _regression_inputs(group: TensorGroup) -> tuple[list[torch.Tensor], list[torch.Tensor], bool] | None:
    """(weights as [out, in], Grams, transposed) of the regressed models, or None when the tensor is not a
    linear weight with a Gram in every one of them."""
    models = group.non_base
    if "grams" not in group.side:  # data-free
        return None
    grams = [_scaled_gram(group, i) for i in models]
    if any(g is None for g in grams):
        return None
    transposed = grams[0][1]
    weights = [group.tensors[i].T if transposed else group.tensors[i] for i in models]
    return weights, [g for g, _ in grams], transposed


# ---- the wrapped (anchor / fallback) method ----

def without_base(group: TensorGroup) -> TensorGroup:
    if group.base_index is None:
        return group
    keep = group.non_base
    return dataclasses.replace(group, tensors=[group.tensors[i] for i in keep], base_index=None,
                               per_model=[group.per_model[i] for i in keep],
                               side={k: [v[i] for i in keep] for k, v in group.side.items()},
                               side_folders={k: [v[i] for i in keep] for k, v in group.side_folders.items()},
                               input_names=[group.input_names[i] for i in keep])


def wrap(outer: MergeMethod, inner: MergeMethod, prefix: str, merge) -> MergeMethod:
    """outer's parameters plus inner's (colliding names prefixed, `weight` defaulting to 1); the merge
    function gets the group and a callable computing inner's merge of the same group."""
    own = {p.name for p in outer.params}
    renamed = {}
    params = list(outer.params)
    for p in inner.params:
        name = prefix + p.name if p.name in own else p.name
        renamed[name] = p.name
        if p.name == "weight" and p.required:
            p = dataclasses.replace(p, default=1.0)
        params.append(dataclasses.replace(p, name=name))

    def back(values: dict) -> dict:
        return {renamed[k]: v for k, v in values.items() if k in renamed}

    def inner_merge(group: TensorGroup) -> torch.Tensor:
        if inner.base == "ignored":
            group = without_base(group)  # a base-less method (linear...) merges the regressed models only
        return inner.merge(dataclasses.replace(group, shared=back(group.shared),
                                               per_model=[back(m) for m in group.per_model]))

    def inner_problem(shared: dict, per_model: list[dict], compute: torch.dtype) -> str | None:
        """inner's tensor_problem (per_model as inner merges them: the plan leaves out the base where it takes none)."""
        return inner.tensor_problem(back(shared), [back(m) for m in per_model], compute)

    return dataclasses.replace(outer, params=tuple(params), merge=lambda group: merge(group, inner_merge),
                               wrapped=inner_merge, inner=inner,
                               tensor_problem=inner_problem if inner.tensor_problem else None,  # (outer has none)
                               side_inputs=tuple(dict.fromkeys(outer.side_inputs + inner.side_inputs)),
                               notes=f"{outer.name} wrapping {inner.name}")


def specialize(outer: MergeMethod, prefix: str, default: str, merge, global_params: dict, registry: dict,
               side_inputs=None) -> MergeMethod:
    """The outer method bound to the inner method its global parameter names (ValueError if unusable);
    side_inputs(global_params), when given, says which side inputs the bound method reads."""
    name = global_params.get(prefix.rstrip("_"), default)
    inner = registry.get(name) if isinstance(name, str) else None
    if inner is None or inner.specialize is not None or inner.side_inputs:
        usable = sorted(n for n, m in registry.items() if m.specialize is None and not m.side_inputs)
        raise ValueError(f"parameters.{prefix.rstrip('_')}: {name!r} is not a weight-only merge method of this "
                         f"engine (one of {', '.join(usable)})")
    method = wrap(outer, inner, prefix, merge)
    return dataclasses.replace(method, side_inputs=side_inputs(global_params)) if side_inputs else method


def wrapping(outer: MergeMethod, prefix: str, default: str, merge, side_inputs=None) -> MergeMethod:
    """outer, bound at plan time to the inner method its global parameter prefix.rstrip('_') names."""
    return dataclasses.replace(outer, specialize=functools.partial(specialize, outer, prefix, default, merge,
                                                                   side_inputs=side_inputs))


# ---- RegMean ----

def _regmean(group: TensorGroup, fallback) -> torch.Tensor:
    inputs = _regression_inputs(group)
    if inputs is None:
        return fallback(group)
    weights, grams, transposed = inputs
    merged = regression.regmean(weights, grams, group.shared["alpha"], solve_dtype(group))
    return merged.T if transposed else merged


SOLVE = ParamSpec("solve_dtype", str, Scope.SHARED, "float64", check=one_of(*SOLVE_DTYPES))


REGMEAN = wrapping(MergeMethod(
    "regmean", lambda group: _regmean(group, None),
    (ParamSpec("alpha", float, Scope.SHARED, 0.9, check=in_unit_interval),
     ParamSpec("gram_scale", str, Scope.SHARED, "tokens", check=one_of("tokens", "trace")),
     ParamSpec("fallback", str, Scope.SHARED, "linear"),
     SOLVE),
    base="optional", side_inputs=("grams",), reference="https://arxiv.org/abs/2212.09849"),
    "fallback_", "linear", _regmean)


# ---- Bayesian Model Merging ----

NOT_LINEAR = ("embed", "wte", "wpe", "lm_head")  # in the names of 2-D weights that are lookups or the output head
SHARED_EMBEDDING = "shared"  # T5's and BART's embedding, a whole name part: a MoE's `shared_expert` layers are linear


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """What data-free BMM treats as a linear layer's weight: a 2-D `.weight` that is no embedding or head."""
    return (tensor.dim() == 2 and name.endswith(".weight") and not any(k in name for k in NOT_LINEAR)
            and SHARED_EMBEDDING not in name.split("."))


@dataclasses.dataclass
class BMMTerms:
    """One tensor's BMM inputs: the anchor's value, and for a regressed linear weight its experts' weights
    ([out, in]) and scaled Grams (weights and grams None for any other tensor)."""

    prior: torch.Tensor
    weights: list[torch.Tensor] | None = None
    grams: list[torch.Tensor] | None = None
    transposed: bool = False


def bmm_terms(group: TensorGroup, anchor) -> BMMTerms:
    prior = anchor(group)
    if group.shared["data_free"]:
        if not is_linear_weight(group.name, group.base):
            return BMMTerms(prior)
        # [out, in] as nn.Linear stores it: a Conv1D's [in, out] turned, so the Gram is over its inputs
        turned = (lambda w: w.T) if group.in_out else (lambda w: w)
        weights, base, dtype = [turned(w) for w in group.experts], turned(group.base), solve_dtype(group)
        return BMMTerms(prior, weights, [regression.task_vector_gram(w, base, dtype) for w in weights], group.in_out)
    inputs = _regression_inputs(group)
    if inputs is None:
        return BMMTerms(prior)
    weights, grams, transposed = inputs
    return BMMTerms(prior, weights, grams, transposed)


def _bmm(group: TensorGroup, anchor) -> torch.Tensor:
    terms = bmm_terms(group, anchor)
    if terms.weights is None:
        return terms.prior
    prior = terms.prior.T if terms.transposed else terms.prior
    merged = regression.bmm(terms.weights, terms.grams, prior, group.shared["lambda"], solve_dtype(group))
    return merged.T if terms.transposed else merged


def _bmm_side_inputs(global_params: dict) -> tuple[str, ...]:
    """Data-free BMM reads no Grams."""
    return () if str(global_params.get("data_free", False)).lower() == "true" else ("grams",)


BMM = wrapping(MergeMethod(
    "bmm", lambda group: _bmm(group, None),
    (ParamSpec("lambda", float, Scope.SHARED, 1.0, check=non_negative),
     ParamSpec("gram_scale", str, Scope.SHARED, "trace", check=one_of("tokens", "trace")),
     ParamSpec("anchor", str, Scope.SHARED, "task_arithmetic"),
     ParamSpec("data_free", bool, Scope.SHARED, False),
     SOLVE),
    base="required", min_non_base=1, side_inputs=("grams",), reference="https://arxiv.org/abs/2605.12843"),
    "anchor_", "task_arithmetic", _bmm, _bmm_side_inputs)

METHODS = [REGMEAN, BMM]
