"""Weighted averages and spherical interpolations: linear, slerp, nuslerp, multislerp, karcher,
model_stock, nearswap."""
from __future__ import annotations

import torch

from merge_engine import ops
from merge_engine.methods.base import MergeMethod, TensorGroup
from merge_engine.parameters import ParamSpec, Scope, extrapolates


def _linear(group: TensorGroup) -> torch.Tensor:
    return ops.weighted_sum(group.tensors, [m["weight"] for m in group.per_model], group.shared["normalize"],
                            out=group.output_like(group.tensors[0]))


def _weights_cancel(weights: list[float], dtype: torch.dtype, key: str) -> str | None:
    """Weights that sum to exactly zero in the dtype the divisor is formed in: every element of the
    tensor would be divided by zero (mergekit writes NaN and Inf there)."""
    if float(torch.tensor(weights, dtype=torch.float64).to(dtype).sum()) != 0:
        return None
    return (f"the weights {weights} sum to 0 and {key}: true divides by their sum, so every value would be "
            f"NaN or Inf (set {key}: false or change a weight)")


def _linear_problem(shared: dict, per_model: list[dict], compute: torch.dtype) -> str | None:
    accumulate = torch.float64 if compute == torch.float64 else torch.float32  # as ops.weighted_sum
    return _weights_cancel([m["weight"] for m in per_model], accumulate, "normalize") if shared["normalize"] else None


def _multislerp_problem(shared: dict, per_model: list[dict], compute: torch.dtype) -> str | None:
    weights = [m["weight"] for m in per_model if "weight" in m]  # the base has none
    if len(weights) < 2 or not shared["normalize_weights"]:  # one input is returned as it is
        return None
    return _weights_cancel(weights, compute, "normalize_weights")  # in the inputs' dtype, as ops.multislerp


def _slerp(group: TensorGroup) -> torch.Tensor:
    other = 1 - group.base_index
    return ops.slerp(group.shared["t"], group.base, group.tensors[other], out=group.output_like(group.base))


def _nuslerp(group: TensorGroup) -> torch.Tensor:
    a, b = (group.tensors[i] for i in group.non_base)
    w = group.values("weight")
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    row_wise, flatten = group.shared["nuslerp_row_wise"], group.shared["nuslerp_flatten"]
    if group.base is None:
        return ops.nuslerp(t, a, b, row_wise, flatten)
    return group.base + ops.nuslerp(t, a - group.base, b - group.base, row_wise, flatten)


def _multislerp(group: TensorGroup) -> torch.Tensor:
    p = group.shared
    return ops.multislerp(group.experts, group.values("weight"), group.base,
                          p["normalize_weights"], p["eps"])


def _karcher(group: TensorGroup) -> torch.Tensor:
    """Equal weights over every input: mergekit ignores `weight` and treats a base as one more input."""
    n = len(group.tensors)
    return ops.karcher_mean(group.tensors, [1.0 / n] * n, group.shared["max_iter"], group.shared["tol"])


def _nearswap(group: TensorGroup) -> torch.Tensor:
    return ops.nearswap(group.shared["t"], group.base, group.tensors[1 - group.base_index])


def _model_stock(group: TensorGroup) -> torch.Tensor:
    """Model Stock: interpolate between the base and the experts' mean by t = N cos / (1 + (N-1) cos),
    cos the mean pairwise cosine of the task vectors (per row if filter_wise); t = 0 where singular.

    mergekit's arithmetic in the compute dtype, bit for bit, in bounded memory: its norms and dot products
    are torch reductions over whole task vectors, whose fp32 accumulation order only the same reduction
    of the same tensor reproduces, so each task vector is rebuilt (exactly: one subtraction) where a pair
    needs it, in two tensor-sized scratch buffers (one of them the output's), instead of holding all N
    and their products (3.3 GB peak on a 1.1B three-expert merge); the elementwise rest runs in chunks."""
    w0, ws = group.base, group.experts
    shape, n, filter_wise = w0.shape, len(ws), group.shared["filter_wise"]
    if filter_wise:  # cosines along the last dim (a 1-D tensor is one row)
        view = (lambda x: x.unsqueeze(0)) if w0.dim() == 1 else (lambda x: x)
    else:
        view = (lambda x: x.reshape(-1))
    w0, ws = view(w0), [view(w) for w in ws]
    out = group.output_like(group.base)
    a = view(out) if out is not None else torch.empty_like(w0)
    b = torch.empty_like(w0)
    norms: dict[int, torch.Tensor] = {}
    cosines = []
    for i in range(n - 1):
        torch.sub(ws[i], w0, out=a)
        norms.setdefault(i, torch.norm(a, dim=-1))
        for j in range(i + 1, n):
            torch.sub(ws[j], w0, out=b)
            norms.setdefault(j, torch.norm(b, dim=-1))
            dot = b.mul_(a).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    del b
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, 1, denominator))
    for part in _leading_slices(w0):
        tp = t[part] if filter_wise else t
        a[part] = tp * (sum(w[part] for w in ws) / n) + (1 - tp) * w0[part]
    return a.reshape(shape) if out is None else out


_CHUNK = 1 << 20  # elements per step of model_stock's elementwise pass


def _leading_slices(x: torch.Tensor) -> list:
    """Slices of x's first dim that cover it about _CHUNK elements at a time; a 0-d x (a filter_wise model_stock
    of a scalar, which has no rows to slice) in one step, `...`."""
    if x.dim() == 0:
        return [...]
    per_index = max(1, x.numel() // max(1, x.shape[0]))
    step = max(1, _CHUNK // per_index)
    return [slice(start, start + step) for start in range(0, x.shape[0], step)]


METHODS = [
    MergeMethod("linear", _linear, (ParamSpec("weight", float, Scope.INPUT),
                                    ParamSpec("normalize", bool, Scope.SHARED, True)),
                reference="https://arxiv.org/abs/2203.05482", tensor_problem=_linear_problem),
    MergeMethod("slerp", _slerp, (ParamSpec("t", float, Scope.SHARED, caution=extrapolates),), base="required",
                min_inputs=2, max_inputs=2, reference="https://en.wikipedia.org/wiki/Slerp"),
    MergeMethod("nuslerp", _nuslerp, (ParamSpec("weight", float, Scope.NON_BASE),
                                      ParamSpec("nuslerp_row_wise", bool, Scope.SHARED, False),
                                      ParamSpec("nuslerp_flatten", bool, Scope.SHARED, True)),
                base="optional", min_non_base=2, max_non_base=2),
    MergeMethod("multislerp", _multislerp, (ParamSpec("weight", float, Scope.NON_BASE),
                                            ParamSpec("normalize_weights", bool, Scope.SHARED, True),
                                            ParamSpec("eps", float, Scope.SHARED, 1e-8)),
                base="optional", min_non_base=1, reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
                tensor_problem=_multislerp_problem),
    MergeMethod("karcher", _karcher, (ParamSpec("max_iter", int, Scope.SHARED, 10),
                                      ParamSpec("tol", float, Scope.SHARED, 1e-5)),
                reference="https://arxiv.org/abs/2603.04972"),
    MergeMethod("nearswap", _nearswap, (ParamSpec("t", float, Scope.SHARED),), base="required",
                min_inputs=2, max_inputs=2, reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    MergeMethod("model_stock", _model_stock, (ParamSpec("filter_wise", bool, Scope.SHARED, False),),
                base="required", min_inputs=3, reference="https://arxiv.org/abs/2403.19522"),
]


def _passthrough(group: TensorGroup) -> torch.Tensor:
    x, scale = group.tensors[0], group.per_model[0]["scale"]
    return x.clone() if scale is None else x * scale


METHODS.append(MergeMethod("passthrough", _passthrough, (ParamSpec("scale", float, Scope.INPUT, None),),
                           min_inputs=1, max_inputs=1))
