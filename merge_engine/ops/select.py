"""Exact magnitude selection as a cut-off: which elements a stable sort of |x| puts first.

key(x) is the bit pattern of |x| read as an integer; for IEEE floats it orders magnitudes exactly as
the values do (+0 lowest, +Inf highest, NaN above Inf). A cut-off (key T, index c) describes the
first `count` elements of the stable order of the keys, in which equal keys keep index order:

    largest=True  (descending): {key > T} | {key == T and index < c}
    largest=False (ascending):  {key < T} | {key == T and index < c}

This is the tie rule of every magnitude ordering in merge_engine (TIES top-k, breadcrumbs window):
among equal magnitudes the lower flat index comes first. Kernels find (T, c) without sorting (radix
select over the keys, then a count of equal keys in index order) and must return the same pair as
this reference, which sorts. count = 0 and count = numel give the fixed cut-offs that select nothing
and everything: (NOTHING_LARGEST, 0) and (-1, 0) for largest, the reverse for ascending; and
c = numel whenever every element with key T is selected, so a kernel needs no index scan then.
"""
from __future__ import annotations

import torch

from merge_engine.ops import backends
from merge_engine.ops.library import op

_KEY_VIEW = {torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF),
             torch.float32: (torch.int32, 0x7FFFFFFF), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF)}
NOTHING_LARGEST = (1 << 63) - 1  # key no magnitude reaches: the descending cut-off that selects nothing
NOTHING_SMALLEST = -1  # below every key: the ascending cut-off that selects nothing


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys of |x| (see the module docstring)."""
    if x.dtype not in _KEY_VIEW:
        raise ValueError(f"magnitudes are ordered for {', '.join(str(d) for d in _KEY_VIEW)} tensors, not {x.dtype}")
    view, mask = _KEY_VIEW[x.dtype]
    return x.detach().reshape(-1).view(view).to(torch.int64) & mask


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """NaN or Inf raise ValueError (merge inputs: a checkpoint holding them is corrupt)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} has {bad} NaN or Inf value(s); a magnitude ordering is undefined")


def check_ordered(x: torch.Tensor, what: str = "input") -> None:
    """NaN raises ValueError: it has no place in the magnitude order (+-Inf are its largest magnitudes)."""
    nan = torch.isnan(x)
    if bool(nan.any()):
        raise ValueError(f"{what} has {int(nan.sum())} NaN value(s); a magnitude ordering is undefined")


def magnitude_cutoff_reference(x: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """int64 [T, c] selecting the first `count` elements of the stable order of |x| (module docstring).

    NaN in x raises ValueError (+-Inf are the largest magnitudes: a merge's delta may overflow to Inf
    from finite inputs); count is clamped to [0, numel]."""
    check_ordered(x)
    keys = magnitude_keys(x)
    n = keys.numel()
    count = min(max(count, 0), n)
    if count in (0, n):
        nothing, everything = (NOTHING_LARGEST, NOTHING_SMALLEST) if largest else (NOTHING_SMALLEST, NOTHING_LARGEST)
        return torch.tensor([nothing if count == 0 else everything, 0], dtype=torch.int64, device=x.device)
    order = torch.argsort(keys, descending=largest, stable=True)
    last = int(order[count - 1])
    t = int(keys[last])
    beyond = int((keys > t).sum()) if largest else int((keys < t).sum())
    all_equal_selected = int((keys == t).sum()) == count - beyond
    return torch.tensor([t, n if all_equal_selected else last + 1], dtype=torch.int64, device=x.device)


@op("magnitude_cutoff")
def magnitude_cutoff(x: torch.Tensor, count: int, largest: bool = True) -> torch.Tensor:
    """int64 [T, c]: the cut-off of the first `count` elements (clamped to [0, numel]) of the stable order of
    the magnitudes |x| over the whole tensor, descending when `largest` (TIES' top-k), else ascending
    (breadcrumbs' smallest). An element is selected when key(|x|) > T (< T when ascending) or key == T and
    its flat index < c (the module docstring; cutoff_mask turns it into a mask). x: fp16, bf16, fp32 or fp64;
    NaN raises ValueError."""
    return magnitude_cutoff_reference(x, count, largest)


def _cutoff_with(backend, x: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """The cut-off by a compiled backend's select (delta_cutoffs), on |x - 0| (the same keys as |x|), on x's
    device; the reference where there is no backend or the input is not one it serves."""
    if backend is None or not backends.served_by_kernels(x):
        return magnitude_cutoff_reference(x, count, largest)
    try:
        cut = backend.delta_cutoffs(torch.zeros_like(x), x, [min(max(count, 0), x.numel())], largest)[0]
    except ValueError as e:  # the kernel checks x as "the expert" of a merge (against a zero base)
        raise ValueError(str(e).replace("the expert", "input", 1)) from None
    return cut.to(x.device)  # the GPU backends find cut-offs on the host


@magnitude_cutoff.register_kernel("cpu")
def _magnitude_cutoff_cpu(x, count, largest=True):
    """The CPU extension's select."""
    return _cutoff_with(backends.cpu_extension(), x, count, largest)


@magnitude_cutoff.register_kernel("cuda")
def _magnitude_cutoff_cuda(x, count, largest=True):
    """The GPU backend's radix select. The reference's argsort cannot run there past 2**31 - 1 elements (a GPU
    sorts at most that many values in one dimension), which a fused MoE tensor passes."""
    return _cutoff_with(backends.gpu_backend(), x, count, largest)


@magnitude_cutoff.register_fake
def _(x, count, largest=True):
    return x.new_empty(2, dtype=torch.int64)


def cutoff_mask(x: torch.Tensor, cutoff: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """Boolean mask (shape of x) of the elements a cut-off selects."""
    keys = magnitude_keys(x)
    t, c = (int(v) for v in cutoff.tolist())
    index = torch.arange(keys.numel(), device=keys.device)
    beyond = keys > t if largest else keys < t
    return (beyond | ((keys == t) & (index < c))).reshape(x.shape)
