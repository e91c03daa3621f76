"""Merges of tensors and state dicts already in memory, with mergekit 0.1.5's Python API (`merge_tensors`,
`merge_state_dicts`, `PerGroupValues`): the methods, parameters, ops and kernels of a config merge, no files.

Parameters are the method's, one value each (no gradients or filters: a group has no layer position): a scalar
applies to every input, a sequence gives one value per input in order (for parameters of the non-base inputs, one
per non-base input), a mapping one per input id, and PerGroupValues one value (of any of those forms) per tensor
group. Inputs are cast to `dtype` (default: the inputs' promoted dtype) and merged on their device; results come in
the method's dtype, or `out_dtype`.
"""
from __future__ import annotations

import operator
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from merge_engine.methods import REGISTRY, MergeMethod, TensorGroup
from merge_engine.parameters import ParamSpec, Scope
from merge_engine.plan import promoted_dtype

StateDictLike = Mapping[str, torch.Tensor] | torch.nn.Module


class PerGroupValues:
    """One parameter value per tensor group: for merge_state_dicts, per tensor of the first state dict, in order."""

    def __init__(self, values: Sequence[Any]):
        self.values = tuple(values)

    def __repr__(self) -> str:
        return f"PerGroupValues({list(self.values)!r})"


def merge_tensors(tensors: Sequence[torch.Tensor], method: str | MergeMethod, *,
                  parameters: Mapping[str, Any] | None = None, ids: Sequence[Hashable] | None = None,
                  base_index: int | None = None, name: str | None = None, dtype: torch.dtype | None = None,
                  out_dtype: torch.dtype | None = None, random_seed: int = 0) -> torch.Tensor:
    """Merge the inputs of one output tensor (ids name them for per-input parameters given as a mapping; default
    0, 1, ...). name: the tensor's name, which keys the random methods' drops (with random_seed), as in a merge."""
    tensors = list(tensors)
    ids = tuple(range(len(tensors))) if ids is None else tuple(ids)
    if len(ids) != len(tensors):
        raise ValueError(f"ids and tensors must have the same length, got {len(ids)} and {len(tensors)}")
    base_index = _integer("base_index", base_index)
    if base_index is not None and not 0 <= base_index < len(tensors):
        raise ValueError(f"base_index is out of range for {len(tensors)} tensors, got {base_index!r}")
    if name is not None and not isinstance(name, str):  # (the kernels' ops take a str, and say so in TorchScript)
        raise TypeError(f"name must be a tensor name (a string) or None, got {name!r}")
    method, parameters = _method(method, parameters)
    base = None if base_index is None else ids[base_index]
    _check_inputs(method, ids, base, name)
    return _merge_group(method, name or "", tensors, ids, base_index, _bound(method, parameters, 0, 1), dtype,
                        out_dtype, random_seed)


def merge_state_dicts(models: Mapping[Hashable, StateDictLike] | Sequence[StateDictLike], method: str | MergeMethod,
                      *, parameters: Mapping[str, Any] | None = None, base: Hashable | None = None,
                      strict: bool = True, dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None,
                      random_seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge models (state dicts or modules, as a sequence or a mapping of id -> model) tensor by tensor, in the
    first one's order. strict: every model has the same tensor names (else ValueError); otherwise the names all
    have are merged. A tensor that is not floating point in some model is copied where every model holds the
    same one (else ValueError). Modules are read through state_dict(): the results carry no autograd graph."""
    items = list(models.items()) if isinstance(models, Mapping) else list(enumerate(models))
    if not items:
        raise ValueError("merge_state_dicts needs at least one model")
    ids = [key for key, _ in items]
    if base is not None and base not in ids:
        raise ValueError(f"base {base!r} is not one of the models' ids {ids!r}")
    state_dicts = [_state_dict(model, key) for key, model in items]
    names = _tensor_names(state_dicts, ids, strict)
    method, parameters = _method(method, parameters)
    _check_inputs(method, ids, base, None)
    base_index = None if base is None else ids.index(base)
    merged = {}
    for index, name in enumerate(names):
        tensors = [sd[name] for sd in state_dicts]
        if all(t.is_floating_point() for t in tensors):
            merged[name] = _merge_group(method, name, tensors, ids, base_index,
                                        _bound(method, parameters, index, len(names)), dtype, out_dtype, random_seed)
        else:
            merged[name] = _agreed_buffer(name, tensors, ids)
    return merged


def _method(method: str | MergeMethod, parameters: Mapping[str, Any] | None) -> tuple[MergeMethod, dict[str, Any]]:
    """The method (by name, specialised by its global parameters where it wraps another) and the parameters."""
    parameters = dict(parameters or {})
    if isinstance(method, str):
        if method not in REGISTRY:
            raise ValueError(f"unknown merge method {method!r} (known: {', '.join(sorted(REGISTRY))})")
        method = REGISTRY[method]
    if not isinstance(method, MergeMethod):
        raise TypeError(f"method must be a method name or a merge_engine MergeMethod, got {type(method).__name__}")
    if method.specialize is not None:
        method = _specialized(method, parameters)
    if method.side_inputs:
        raise ValueError(f"merge method '{method.name}' reads per-model statistics ({', '.join(method.side_inputs)}) "
                         "from folders: merge with a config instead (merge-engine CONFIG OUT, or MergeSession)")
    unknown = sorted(set(parameters) - {p.name for p in method.params})
    if unknown:
        raise TypeError(f"unknown parameter(s) for merge method '{method.name}': {', '.join(map(str, unknown))} "
                        f"(it takes: {', '.join(p.name for p in method.params) or 'none'})")
    return method, parameters


def _specialized(method: MergeMethod, parameters: dict[str, Any]) -> MergeMethod:
    """A wrapping method bound to its inner method by its global parameters; ValueError for one of those given per
    tensor group (PerGroupValues), which the binding cannot follow: it would be left out without a word."""
    fixed = {k: v for k, v in parameters.items() if not isinstance(v, PerGroupValues)}
    specialized = method.specialize(fixed, REGISTRY)
    def binding(m: MergeMethod) -> tuple:
        return m.inner.name if m.inner else None, m.side_inputs
    for key, value in parameters.items():
        if not isinstance(value, PerGroupValues):
            continue
        distinct: list[Any] = []
        for v in value.values:
            if v not in distinct:
                distinct.append(v)
        if any(binding(method.specialize({**fixed, key: v}, REGISTRY)) != binding(specialized) for v in distinct):
            raise ValueError(f"parameter '{key}' chooses how merge method '{method.name}' merges: give it one "
                             "value, not PerGroupValues")
    return specialized


def _check_inputs(method: MergeMethod, ids: Sequence[Hashable], base: Hashable | None, name: str | None) -> None:
    try:
        distinct = set(ids)
    except TypeError:
        raise TypeError(f"input ids must be hashable (they key the per-input parameters), got {list(ids)!r}") from None
    if len(distinct) != len(ids) or None in ids:
        raise ValueError(f"input ids must be distinct and not None, got {list(ids)!r}")
    problems = method.input_problems(list(ids), base, _label(name or ""))
    if problems:
        raise ValueError("; ".join(problems))


def _bound(method: MergeMethod, parameters: dict[str, Any], group: int, groups: int) -> dict[str, Any]:
    """Each parameter's value for tensor group `group` of `groups` (PerGroupValues picked), not yet per input."""
    out = {}
    for name, value in parameters.items():
        if isinstance(value, PerGroupValues):
            if len(value.values) != groups:
                raise ValueError(f"parameter '{name}': PerGroupValues holds {len(value.values)} values for {groups} "
                                 "tensor group(s)")
            value = value.values[group]
        out[name] = value
    return out


def _merge_group(method: MergeMethod, name: str, tensors: list[torch.Tensor], ids: Sequence[Hashable],
                 base_index: int | None, supplied: dict[str, Any], dtype: torch.dtype | None,
                 out_dtype: torch.dtype | None, seed: int) -> torch.Tensor:
    for what, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
            raise ValueError(f"{what} must be a floating-point torch.dtype or None, got {value!r}")
    seed = _integer("random_seed", seed)
    if seed is None or not -2**63 <= seed < 2**63:  # the keyed generator's 64-bit seed
        raise ValueError(f"random_seed must be an integer in [-2**63, 2**63), got {seed!r}")
    _check_alike(name, tensors)
    compute = dtype or _promoted(name, tensors)
    shared, per_model = _parameters(method, supplied, ids, base_index, name)
    non_base = [i for i in range(len(tensors)) if i != base_index]
    checked = [per_model[i] for i in non_base] if method.inner and method.inner.base == "ignored" else per_model
    problem = method.tensor_problem and method.tensor_problem(shared, checked, compute)
    if problem:
        raise ValueError(f"{_label(name)}: merge method '{method.name}': {problem}")
    with torch.no_grad():
        group = TensorGroup(name, [t.to(compute) for t in tensors], base_index, shared, per_model, seed,
                            input_names=[name] * len(tensors))
        try:
            result = method.merge(group).to(out_dtype or method.output_dtype(compute))
        except ValueError as e:  # the ops know their inputs by position only
            raise ValueError(f"merging {_label(name)} failed: {e}") from e
    if any(result.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in tensors):
        result = result.clone()  # (passthrough's input itself): the caller's tensor is not theirs to change through it
    return result


def _parameters(method: MergeMethod, supplied: dict[str, Any], ids: Sequence[Hashable], base_index: int | None,
                name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The group's shared parameters, and each input's (the base's: only those of every input), as a config merge
    resolves them."""
    non_base = [i for i in range(len(ids)) if i != base_index]
    shared = {p.name: _value(p, supplied, name) for p in method.shared_params}
    per_model: list[dict[str, Any]] = [{} for _ in ids]
    for p in method.model_params:
        entries = non_base if p.scope == Scope.NON_BASE else list(range(len(ids)))
        for i, value in zip(entries, _per_input(p, supplied, [ids[i] for i in entries], name)):
            per_model[i][p.name] = value
    return shared, per_model


def _integer(what: str, value: Any) -> int | None:
    """value as an int where it is an integer of any kind (numpy's, torch's 0-d), not a bool; None stays None."""
    if value is None:
        return None
    try:
        if not isinstance(value, bool):
            return operator.index(value)
    except TypeError:
        pass
    raise TypeError(f"{what} must be an integer, got {value!r}")


def _label(name: str) -> str:
    """How messages name a tensor group (merge_tensors' may have no name)."""
    return f"tensor {name!r}" if name else "the tensors"


def _check_alike(name: str, tensors: list[torch.Tensor]) -> None:
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"{_label(name)}: the inputs must be tensors, got "
                        f"{', '.join(sorted({type(t).__name__ for t in tensors}))}")
    if not all(t.is_floating_point() for t in tensors):
        raise ValueError(f"{_label(name)}: only floating-point tensors merge, got "
                         f"{', '.join(sorted({str(t.dtype) for t in tensors}))} (merge_state_dicts copies other tensors "
                         "where every model holds the same)")
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) > 1:
        raise ValueError(f"{_label(name)}: the inputs' shapes differ: {shapes}")
    devices = [t.device for t in tensors]
    if len(set(devices)) > 1:
        raise ValueError(f"{_label(name)}: the inputs are on different devices: {[str(d) for d in devices]}")


def _promoted(name: str, tensors: list[torch.Tensor]) -> torch.dtype:
    """The inputs' promoted dtype (as a config merge's), which must be one torch computes in."""
    out = promoted_dtype([t.dtype for t in tensors])
    if out.itemsize == 1:  # 8-bit floats: torch neither promotes nor computes with them
        raise ValueError(f"{_label(name)}: {out} inputs need a dtype to merge in (dtype=torch.bfloat16, ...)")
    return out


def _value(spec: ParamSpec, supplied: dict[str, Any], name: str) -> Any:
    if spec.name not in supplied:
        if spec.required:
            raise TypeError(f"missing required parameter '{spec.name}'")
        return spec.default
    try:
        return spec.validate(supplied[spec.name])
    except ValueError as e:
        raise ValueError(f"{_label(name)}: {e}") from None


def _per_input(spec: ParamSpec, supplied: dict[str, Any], ids: list[Hashable], name: str) -> list[Any]:
    """A per-input parameter's value for each of the inputs `ids`: a mapping by id, a sequence in order, or one
    value for all."""
    if spec.name not in supplied:
        return [_value(spec, supplied, name)] * len(ids) if ids else []
    value = supplied[spec.name]
    if isinstance(value, Mapping):
        missing = [key for key in ids if key not in value]
        if missing:
            raise ValueError(f"parameter '{spec.name}' has no value for input(s) {missing!r}")
        values = [value[key] for key in ids]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != len(ids):
            scope = "non-base input" if spec.scope == Scope.NON_BASE else "input"
            raise ValueError(f"parameter '{spec.name}' needs one value per {scope} ({len(ids)}), got {len(value)}")
        values = list(value)
    else:
        values = [value] * len(ids)
    return [_value(spec, {spec.name: v}, name) for v in values]


def _state_dict(model: StateDictLike, key: Hashable) -> Mapping[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if not isinstance(model, Mapping):
        raise TypeError(f"model {key!r}: expected a state dict or a torch.nn.Module, got {type(model).__name__}")
    bad = next((n for n, t in model.items() if not isinstance(n, str) or not isinstance(t, torch.Tensor)), None)
    if bad is not None:
        raise TypeError(f"model {key!r}: a state dict maps names (strings) to tensors; {bad!r} does not")
    return model


def _tensor_names(state_dicts: list[Mapping[str, torch.Tensor]], ids: list[Hashable], strict: bool) -> list[str]:
    names = [set(sd) for sd in state_dicts]
    every = set.intersection(*names)
    if strict and any(n != names[0] for n in names[1:]):
        lacking = {key: sorted(set.union(*names) - n)[:5] for key, n in zip(ids, names) if n != set.union(*names)}
        raise ValueError(f"the state dicts hold different tensor names (strict=False merges the common ones); "
                         f"lacking: {lacking}")
    return [name for name in state_dicts[0] if name in every]


def _agreed_buffer(name: str, tensors: list[torch.Tensor], ids: list[Hashable]) -> torch.Tensor:
    """A tensor that is not floating point somewhere (a buffer of positions, a step count): copied where every model
    holds the same."""
    first = tensors[0]
    devices = [t.device for t in tensors]
    if len(set(devices)) > 1:  # (torch.equal refuses to compare them)
        raise ValueError(f"tensor {name!r}: the models' tensors are on different devices: {[str(d) for d in devices]}")
    differing = [key for key, t in zip(ids[1:], tensors[1:]) if t.dtype != first.dtype or not torch.equal(t, first)]
    if differing:
        raise ValueError(f"tensor {name!r} is not floating point and differs between models {ids[0]!r} and "
                         f"{differing[0]!r}: there is nothing to merge it with; make them agree first")
    return first.clone()
