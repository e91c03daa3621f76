"""Fisher ops: the diagonal-Fisher accumulation F += scale * g^2 and the Fisher-weighted average of
K tensors (Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", arXiv 2111.09832).

The pure-PyTorch references below are the specification. Every step is one correctly rounded
operation in the accumulation dtype (fp32; fp64 for fp64 inputs), in the order written, so the
compiled kernels (csrc/cpu/fisher.cpp, csrc/cuda/fisher.cu, triton_kernels/fisher.py) reproduce
them bit for bit.

Floors follow the paper's code: model j's Fisher is raised to floors[j] before weighting. Its default
("favour the target model") floors only the first model, so where no model has Fisher information
the merge returns the first model's value, and a donor whose Fisher is zero everywhere is ignored
exactly. Where every weighted Fisher is zero (all floors 0), the output is the first model's value.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from merge_engine.ops import backends
from merge_engine.ops.library import kernel_out, op, spans_overlap

FISHER_DTYPES = backends.KERNEL_DTYPES  # of the Fisher buffers and gradients the kernels take


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- accumulate_fisher ----

def check_accumulate_args(fisher: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    if fisher.shape != grad.shape:
        raise ValueError(f"accumulate_fisher: fisher has shape {list(fisher.shape)} but grad {list(grad.shape)}")
    if fisher.device != grad.device:
        raise ValueError(f"accumulate_fisher: fisher is on {fisher.device} but grad on {grad.device}")
    if not fisher.dtype.is_floating_point or not grad.dtype.is_floating_point:
        raise ValueError("accumulate_fisher: fisher and grad must be floating point")
    if spans_overlap(fisher, grad):  # the kernels read grad while they write fisher
        raise ValueError("accumulate_fisher: fisher and grad share memory")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"accumulate_fisher: scale must be a finite number >= 0, got {scale}")


def accumulate_fisher_reference(fisher: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    """fisher += (g * g) * scale in the accumulation dtype, stored back in fisher's dtype."""
    check_accumulate_args(fisher, grad, scale)
    acc = accumulation_dtype(fisher.dtype)
    g = grad.detach().to(acc)
    term = (g * g) * torch.tensor(scale, dtype=acc)
    fisher.copy_(fisher.to(acc) + term)


@op("accumulate_fisher", mutates_args=("fisher",))
def accumulate_fisher(fisher: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    """In place: fisher += scale * grad^2 (scale finite, >= 0), reading grad in its own dtype (fp32 math, fp64 for
    an fp64 fisher: see the reference). fisher and grad must not share memory."""
    accumulate_fisher_reference(fisher, grad, scale)


def _accumulate_with(backend, fisher, grad, scale):
    if (backend is None or fisher.dtype not in FISHER_DTYPES or grad.dtype not in FISHER_DTYPES
            or not fisher.is_contiguous() or not grad.is_contiguous()):
        return accumulate_fisher_reference(fisher, grad, scale)
    check_accumulate_args(fisher, grad, scale)
    backend.accumulate_fisher(fisher, grad, scale)


@accumulate_fisher.register_kernel("cpu")
def _accumulate_fisher_cpu(fisher, grad, scale):
    _accumulate_with(backends.cpu_extension(), fisher, grad, scale)


@accumulate_fisher.register_kernel("cuda")
def _accumulate_fisher_cuda(fisher, grad, scale):
    _accumulate_with(backends.gpu_backend("fisher"), fisher, grad, scale)


# ---- fisher_merge ----

def check_merge_args(params: list[torch.Tensor], fishers: list[torch.Tensor], coefficients: list[float],
                     floors: list[float]) -> None:
    k = len(params)
    if k == 0 or not (len(fishers) == len(coefficients) == len(floors) == k):
        raise ValueError(f"fisher_merge: need as many fishers, coefficients and floors as params (got {k} params, "
                         f"{len(fishers)} fishers, {len(coefficients)} coefficients, {len(floors)} floors)")
    for j, (p, f) in enumerate(zip(params, fishers)):
        if p.shape != params[0].shape or f.shape != params[0].shape:
            raise ValueError(f"fisher_merge: model {j}: param {list(p.shape)} and Fisher {list(f.shape)} must "
                             f"have the shape of model 0's param {list(params[0].shape)}")
        if p.dtype != params[0].dtype or f.dtype != fishers[0].dtype:
            raise ValueError(f"fisher_merge: model {j}: params must share one dtype and Fishers another")
        if p.device != params[0].device or f.device != params[0].device:
            raise ValueError(f"fisher_merge: model {j}: param on {p.device} and Fisher on {f.device}; every param "
                             f"and Fisher must be on model 0's param's device ({params[0].device})")
    bad = [(j, v) for j, v in enumerate(list(coefficients) + list(floors)) if not v >= 0 or v == float("inf")]
    if bad:
        raise ValueError("fisher_merge: coefficients and floors must be finite and >= 0, got "
                         f"coefficients={list(coefficients)}, floors={list(floors)}")


def invalid_fisher_message(j: int, count: int) -> str:
    return f"the Fisher of model {j} has {count} negative, NaN or Inf value(s); a Fisher is a mean of squares"


def check_fisher_values(fishers: list[torch.Tensor]) -> None:
    """ValueError naming the first model whose Fisher has a negative, NaN or Inf entry."""
    for j, f in enumerate(fishers):
        bad = int((~(torch.isfinite(f) & (f >= 0))).sum())
        if bad:
            raise ValueError(invalid_fisher_message(j, bad))


def fisher_merge_reference(params: list[torch.Tensor], fishers: list[torch.Tensor], coefficients: list[float],
                           floors: list[float]) -> torch.Tensor:
    """sum_j c_j max(F_j, floor_j) theta_j / sum_j c_j max(F_j, floor_j), in the params' dtype.

    In the accumulation dtype, model by model:  d = max(F_j, floor_j) * c_j (F_j where F_j == floor_j, so a -0
    Fisher at floor 0 weighs -0);  num += d * theta_j;  den += d;  then num / den where den > 0, else theta_0.
    """
    check_merge_args(params, fishers, coefficients, floors)
    check_fisher_values(fishers)
    acc = accumulation_dtype(params[0].dtype)
    num = den = None
    for p, f, c, fl in zip(params, fishers, coefficients, floors):
        f, floor = f.to(acc), torch.tensor(fl, dtype=acc)
        # max keeping F on a tie, as the kernels: clamp_min picks either zero of a -0 / +0 tie by position
        d = torch.where(f < floor, floor, f) * torch.tensor(c, dtype=acc)
        term = d * p.to(acc)
        num, den = (term, d) if num is None else (num + term, den + d)
    merged = torch.where(den > 0, num / den, params[0].to(acc))
    # in params[0]'s layout, as the op's fake declares (torch's arithmetic may take the Fishers')
    return torch.empty_like(params[0]).copy_(merged)


@op("fisher_merge", fake="params", out=True, floating=("params", "fishers"))
def fisher_merge(params: list[torch.Tensor], fishers: list[torch.Tensor], coefficients: list[float],
                 floors: list[float], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fisher-weighted average of K tensors in one pass (see fisher_merge_reference), written into `out`
    (a tensor of the params' shape and dtype) when one is given.

    params: K tensors of one shape and dtype; fishers: K tensors of that shape in one floating dtype
    (it may differ from the params'); coefficients (per-model weights, already divided by any Fisher
    normalisation) and floors: K finite values >= 0. A Fisher with a negative, NaN or Inf entry raises
    ValueError; the compiled kernels find it in the pass that writes the result (one read of every input), so
    `out` may then hold part of a result, as an ATen out= argument may after an error."""
    return fisher_merge_reference(params, fishers, coefficients, floors)


def _merge_with(backend, params, fishers, coefficients, floors, out=None):
    """On a compiled backend (into out when given: only the CPU kernel takes one), else the reference."""
    if backend is None or not backends.served_by_kernels(*params) or not backends.served_by_kernels(*fishers):
        return fisher_merge_reference(params, fishers, coefficients, floors)
    check_merge_args(params, fishers, coefficients, floors)
    out = kernel_out("fisher_merge", out, params[0], [*params, *fishers])
    return backend.fisher_merge(list(params), list(fishers), list(coefficients), list(floors),
                                *([out] if out is not None else []))


@fisher_merge.register_kernel("cpu")
def _fisher_merge_cpu(params, fishers, coefficients, floors, out=None):
    return _merge_with(backends.cpu_extension(), params, fishers, coefficients, floors, out)


@fisher_merge.register_kernel("cuda")
def _fisher_merge_cuda(params, fishers, coefficients, floors, out=None):
    # the GPU kernels allocate their result; the out overload copies it into out
    return _merge_with(backends.gpu_backend("fisher"), params, fishers, coefficients, floors)
