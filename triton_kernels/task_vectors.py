"""Triton kernels of the task-vector family, with the functions and semantics of the C++ modules
(csrc/cpu/bindings.cpp): exact magnitude cut-offs by radix select (`delta_cutoffs`) and the fused
one-pass merge of K task vectors (`merge_task_vectors`: task arithmetic, TIES, DARE, breadcrumbs).

DELLA (mode 4, rank) is not implemented here: its keep probability needs a sort of every row,
which this backend leaves to the PyTorch reference; merge_task_vectors raises NotImplementedError
for it and the caller routes DELLA on the GPU to the reference.

Every step mirrors csrc/cpu/fused_merge.cpp, which mirrors the reference
(merge_engine/ops/consensus.py: merge_task_vectors_reference): values are rounded to the tensors'
dtype where torch rounds, and sums over experts run in fp32 in expert order, so outputs are
bit-identical to the reference except for the L1 rescale factor (a ratio of whole-tensor sums taken
in another order). Two things keep the GPU build IEEE-exact: kernels launch with
enable_fp_fusion=False (a fused multiply-add would round differently from torch), and divisions use
tl.math.div_rn (Triton's `/` on fp32 is not correctly rounded on NVIDIA GPUs). bf16 rounding is done
on the bits (round to nearest even), as in the C++ kernel: the Triton interpreter truncates
fp32 -> bf16 casts; bf16 tensors are read and written on the bits too (triton_kernels/fisher.py's _load
and _store), as the interpreter's casts between bf16 and fp32 flush subnormals. The merge reads the experts in place through an int64 tensor of their data
pointers (stacking them would copy K tensors).

On CUDA tensors in production; the Triton interpreter (TRITON_INTERPRET=1) runs them on CPU tensors.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from merge_engine.ops.backends import KERNEL_DTYPES
from merge_engine.ops.select import NOTHING_LARGEST, NOTHING_SMALLEST, check_finite, check_ordered, cutoff_mask
from merge_engine.ops.sparsify import SPARSIFY_CODES, l1_rescale_factor, rescale_in_fp32
from merge_engine.triton_kernels.fisher import _load, _store

NONE, MAGNITUDE, RANDOM, OUTLIERS, RANK = (SPARSIFY_CODES[s] for s in ("", "magnitude", "random", "outliers", "rank"))
BLOCK = 1024  # elements per program
_IEEE = dict(enable_fp_fusion=False)  # launch option of every kernel: no fused multiply-add


# ---- element helpers (csrc/task_vectors.h) ----

@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (nearest even), returned as fp32."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # a GPU's NaN would carry into the sign
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _delta_key(expert, base, DTYPE: tl.constexpr):
    """The delta as the reference forms it (fp32 difference rounded once to DTYPE; returned as fp32)
    and its magnitude key: the bit pattern of |delta| in DTYPE as an integer (ops/select.py)."""
    d = _round(expert - base, DTYPE)
    if DTYPE == tl.bfloat16:
        key = ((d.to(tl.uint32, bitcast=True) >> 16) & 0x7FFF).to(tl.int32)
    elif DTYPE == tl.float16:
        key = d.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        key = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return d, key


@triton.jit
def _load_delta_key(base_ptr, expert_ptr, offs, mask):
    dtype: tl.constexpr = base_ptr.dtype.element_ty
    return _delta_key(_load(expert_ptr, offs, mask), _load(base_ptr, offs, mask), dtype)


@triton.jit
def _uniform(start, stream, key0, key1, BLOCK: tl.constexpr):
    """Uniforms of elements start .. start + BLOCK - 1 (start a multiple of 4) of one stream:
    element i takes word i % 4 of Philox4x32-10(counter (i // 4 low, i // 4 high, stream, 0),
    key (key0, key1)), as (bits >> 8) * 2^-24 (ops/random.py). One Philox call serves 4 elements."""
    block = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    c0 = block.to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c3 = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    c2 = c3 + stream
    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 += 0x9E3779B9
        k1 += 0xBB67AE85
    # tl.join stacks on a new last axis: [b, j, m] is word 2j + m of counter b, so the flat order
    # puts word w of counter b at element 4b + w
    bits = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BLOCK])
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _selected(key, index, t, c, LARGEST: tl.constexpr):
    """Membership in the first `count` elements of the stable order, given its cut-off (t, c)."""
    if LARGEST:
        beyond = key > t
    else:
        beyond = key < t
    return beyond | ((key == t) & (index < c))


@triton.jit
def _keep(key, offs, start, i, cuts_ptr, probs_ptr, key0, key1, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Which elements expert i keeps. Magnitude (descending) and outliers (ascending): the first hi
    minus the first lo of the stable order, cuts[i] = {lo_T, lo_c, hi_T, hi_c}; random: a Philox draw
    below the density (fp32)."""
    if MODE == 2:
        return _uniform(start, i, key0, key1, BLOCK) < tl.load(probs_ptr + i)
    else:
        cut = cuts_ptr + 4 * i
        hi = _selected(key, offs, tl.load(cut + 2), tl.load(cut + 3), MODE == 1)
        lo = _selected(key, offs, tl.load(cut), tl.load(cut + 1), MODE == 1)
        return hi & ~lo


@triton.jit
def _weighted_delta(base, experts_ptr, i, offs, mask, start, weights_ptr, cuts_ptr, probs_ptr, factors_ptr,
                    key0, key1, DTYPE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Expert i's sparsified, rescaled and weighted delta, each step rounded to DTYPE (fp32 values)."""
    expert_ptr = tl.load(experts_ptr + i).to(tl.pointer_type(DTYPE))
    d, key = _delta_key(_load(expert_ptr, offs, mask), base, DTYPE)
    if MODE != 0:
        keep = _keep(key, offs, start, i, cuts_ptr, probs_ptr, key0, key1, MODE, BLOCK)
        # +0 where the reference has d * 0, as the CPU kernel: a zero's sign changes no sum and no agreement,
        # and a dropped delta that overflowed to Inf adds nothing, not NaN
        d = tl.where(keep, d, 0.0)
        d = _round(d * tl.load(factors_ptr + i), DTYPE)  # L1 rescale; factor 1 (exact) where there is none
    return _round(d * tl.load(weights_ptr + i), DTYPE)


# ---- radix select: cut-offs of the stable magnitude order ----

@triton.jit
def _histogram_kernel(base_ptr, expert_ptr, hist_ptr, n, prefix, HIGH: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of the keys of |expert - base|. HIGH: of bits 15.. (fp32 first pass, 65536 bins);
    else of the low 15 bits among keys whose bits 15.. equal prefix (0 for 16-bit dtypes: every key)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    _, key = _load_delta_key(base_ptr, expert_ptr, offs, mask)
    if HIGH:
        bins = key >> 15
    else:
        mask &= (key >> 15) == prefix
        bins = key & 0x7FFF
    tl.atomic_add(hist_ptr + bins, tl.full([BLOCK], 1, tl.int64), mask=mask)


@triton.jit
def _equal_count_kernel(base_ptr, expert_ptr, counts_ptr, n, t, BLOCK: tl.constexpr):
    """Per block: how many keys equal t."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    _, key = _load_delta_key(base_ptr, expert_ptr, offs, mask)
    tl.store(counts_ptr + pid, tl.sum(((key == t) & mask).to(tl.int64), axis=0))


@triton.jit
def _nth_equal_kernel(base_ptr, expert_ptr, out_ptr, n, t, first, need, BLOCK: tl.constexpr):
    """Index just past the need-th key equal to t among elements first .. first + BLOCK - 1 (one program)."""
    offs = first + tl.arange(0, BLOCK).to(tl.int64)  # first < 2**31 is a 32-bit argument, offs + 1 may be 2**31
    mask = offs < n
    _, key = _load_delta_key(base_ptr, expert_ptr, offs, mask)
    equal = (key == t) & mask
    rank = tl.cumsum(equal.to(tl.int32), axis=0)
    tl.store(out_ptr, tl.max(tl.where(equal & (rank == need), offs + 1, 0), axis=0))


def _bins_of_ranks(hist: torch.Tensor, ranks: list[int]) -> list[tuple[int, int, int]]:
    """For each ascending rank r (0-based): (bin holding it, elements below that bin, elements in it)."""
    cum = hist.cumsum(0)
    bins = torch.searchsorted(cum, torch.tensor(ranks, dtype=torch.int64, device=hist.device), right=True)
    return list(zip(bins.tolist(), (cum[bins] - hist[bins]).tolist(), hist[bins].tolist()))


def _histogram(base, expert, high: bool, prefix: int = 0) -> torch.Tensor:
    n = base.numel()
    hist = torch.zeros(1 << (16 if high else 15), dtype=torch.int64, device=base.device)
    _histogram_kernel[(triton.cdiv(n, BLOCK),)](base, expert, hist, n, prefix, HIGH=high, BLOCK=BLOCK, **_IEEE)
    return hist


def _index_after_nth_equal(base, expert, t: int, need: int) -> int:
    """Index just past the need-th element (in index order) whose key is t: per-block counts, a
    cumulative sum, then a scan of the one block where the count is reached."""
    n = base.numel()
    blocks = triton.cdiv(n, BLOCK)
    per_block = torch.empty(blocks, dtype=torch.int64, device=base.device)
    _equal_count_kernel[(blocks,)](base, expert, per_block, n, t, BLOCK=BLOCK, **_IEEE)
    cum = per_block.cumsum(0)
    block = int(torch.searchsorted(cum, torch.tensor([need], device=cum.device)))
    seen = int(cum[block] - per_block[block])
    out = torch.empty(1, dtype=torch.int64, device=base.device)
    _nth_equal_kernel[(1,)](base, expert, out, n, t, block * BLOCK, need - seen, BLOCK=BLOCK, **_IEEE)
    return int(out)


def _cutoffs(base, expert, counts: list[int], largest: bool) -> list[tuple[int, int]]:
    """Cut-offs (T, c) of the first counts[j] elements of the stable order of the keys of
    |expert - base| (ops/select.py), by radix select as csrc/cpu/radix_select.cpp: cutoff_by_histogram."""
    n = base.numel()
    counts = [min(max(c, 0), n) for c in counts]
    nothing, everything = (NOTHING_LARGEST, NOTHING_SMALLEST) if largest else (NOTHING_SMALLEST, NOTHING_LARGEST)
    # fixed cut-offs: every key is beyond the one that selects all; count 0 wins when n is 0
    result = {n: (everything, 0), 0: (nothing, 0)}
    todo = sorted({c for c in counts if c not in result})
    if todo:
        ranks = [n - c if largest else c - 1 for c in todo]  # ascending rank of the cut-off element
        if base.dtype == torch.float32:  # 31-bit keys: high 16 bits, then the low 15 within that prefix
            located = []
            low_hists = {}
            for r, (hbin, hbelow, _) in zip(ranks, _bins_of_ranks(_histogram(base, expert, high=True), ranks)):
                if hbin not in low_hists:
                    low_hists[hbin] = _histogram(base, expert, high=False, prefix=hbin)
                ((lbin, lbelow, equal),) = _bins_of_ranks(low_hists[hbin], [r - hbelow])
                located.append(((hbin << 15) | lbin, hbelow + lbelow, equal))
        else:  # 15-bit keys: one pass
            located = _bins_of_ranks(_histogram(base, expert, high=False), ranks)
        for count, (t, below, equal) in zip(todo, located):
            # keys equal to t fill ascending ranks [below, below + equal); the selection takes `need`
            # of them, the first in index order
            need = count - (n - below - equal) if largest else count - below
            result[count] = (t, n if need == equal else _index_after_nth_equal(base, expert, t, need))
    return [result[c] for c in counts]


def _check_inputs(base: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    if base.dtype not in KERNEL_DTYPES:
        raise TypeError(f"merge_engine Triton kernel: dtype must be float32, bfloat16 or float16, got {base.dtype}")
    for x in (base, *tensors):
        if x.device != base.device or x.dtype != base.dtype or x.shape != base.shape or not x.is_contiguous():
            raise ValueError("merge_engine Triton kernel: the base and experts must be contiguous tensors "
                             "of one device, dtype and shape")


def _on_tensor_device(fn):
    """Run fn on its first argument's CUDA device: Triton launches on the current device (no-op on CPU)."""
    @functools.wraps(fn)
    def on_device(base, *args, **kwargs):
        with torch.cuda.device_of(base):
            return fn(base, *args, **kwargs)
    return on_device


@_on_tensor_device
def delta_cutoffs(base: torch.Tensor, expert: torch.Tensor, counts: list[int], largest: bool) -> torch.Tensor:
    """int64 [len(counts), 2]: the cut-off (key, index) of the first counts[j] elements of the stable
    order of |expert - base| (ops/select.py). NaN in an input or Inf in the base raise ValueError (so
    no delta is NaN; an Inf expert value is an Inf magnitude)."""
    _check_inputs(base, [expert])
    check_finite(base, "the base")
    check_ordered(expert, "the expert")
    return torch.tensor(_cutoffs(base, expert, list(counts), largest), dtype=torch.int64).reshape(-1, 2)


# ---- the fused merge ----

@triton.jit(do_not_specialize=["key0", "key1"])  # a key of 1 would otherwise become a constexpr
def _l1_kernel(base_ptr, experts_ptr, sums_ptr, cuts_ptr, probs_ptr, n, key0, key1,
               MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Per (block, expert): fp32 sums of |delta| and of its kept part, for the L1 rescale factor."""
    pid = tl.program_id(0)
    i = tl.program_id(1)
    dtype: tl.constexpr = base_ptr.dtype.element_ty
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    expert_ptr = tl.load(experts_ptr + i).to(tl.pointer_type(dtype))
    d, key = _load_delta_key(base_ptr, expert_ptr, offs, mask)
    keep = _keep(key, offs, start, i, cuts_ptr, probs_ptr, key0, key1, MODE, BLOCK)
    out = sums_ptr + 2 * (i * tl.num_programs(0) + pid)
    tl.store(out, tl.sum(tl.abs(d), axis=0))
    tl.store(out + 1, tl.sum(tl.where(keep, tl.abs(d), 0.0), axis=0))


@triton.jit(do_not_specialize=["key0", "key1"])
def _merge_kernel(base_ptr, experts_ptr, out_ptr, weights_ptr, cuts_ptr, probs_ptr, factors_ptr, n, K,
                  divisor, lambda_, key0, key1, MODE: tl.constexpr, CONSENSUS: tl.constexpr,
                  NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """base + lambda * mix(weighted deltas) for one block of elements (csrc/cpu: merge_block)."""
    dtype: tl.constexpr = base_ptr.dtype.element_ty
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    base = _load(base_ptr, offs, mask)
    total = tl.zeros([BLOCK], dtype=tl.float32)  # fp32 sum in expert order, as torch's dim-0 sums
    for i in range(K):
        total += _weighted_delta(base, experts_ptr, i, offs, mask, start, weights_ptr, cuts_ptr, probs_ptr,
                                 factors_ptr, key0, key1, dtype, MODE, BLOCK)
    if CONSENSUS:
        # elected sign: + where the sum rounded to the dtype is >= 0 (a zero sum elects +)
        sign = tl.where(_round(total, dtype) >= 0, 1.0, -1.0)
        agree_sum = tl.zeros([BLOCK], dtype=tl.float32)
        agree_w = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(K):  # recomputed rather than kept: K blocks of registers would not fit
            wd = _weighted_delta(base, experts_ptr, i, offs, mask, start, weights_ptr, cuts_ptr, probs_ptr,
                                 factors_ptr, key0, key1, dtype, MODE, BLOCK)
            agree = wd * sign > 0  # exact sign test; zeros never agree
            agree_sum += tl.where(agree, wd, 0.0)
            agree_w += tl.where(agree, tl.load(weights_ptr + i), 0.0)
        mixed = _round(agree_sum, dtype)
        if NORMALIZE:
            agree_w = _round(agree_w, dtype)
            mixed = _round(tl.math.div_rn(mixed, tl.where(agree_w == 0, 1.0, agree_w)), dtype)
    else:
        mixed = _round(total, dtype)
        if NORMALIZE:
            mixed = _round(tl.math.div_rn(mixed, tl.zeros([BLOCK], dtype=tl.float32) + divisor), dtype)
    mixed = _round(mixed * lambda_, dtype)  # exact when lambda is 1
    _store(out_ptr, offs, _round(base + mixed, dtype), mask)


def _rescale_factors(base, pointers, cuts, probs, mode, key0, key1) -> torch.Tensor:
    """mergekit's L1 rescale factor per expert (fp32 [K]) for DARE's draws: |delta|_1 / |kept|_1, each norm
    and the ratio rounded to the dtype (fp16's kept in fp32: ops/sparsify.py, rescale_in_fp32); 1 (none)
    when either norm is < 1e-7. Block sums in fp32, their sum in fp64 (the draws differ from mergekit's anyway)."""
    n, k = base.numel(), pointers.numel()
    blocks = triton.cdiv(n, BLOCK)
    sums = torch.empty(k, blocks, 2, dtype=torch.float32, device=base.device)
    _l1_kernel[(blocks, k)](base, pointers, sums, cuts, probs, n, key0, key1, MODE=mode, BLOCK=BLOCK, **_IEEE)
    work = torch.float32 if base.dtype == torch.float16 else base.dtype
    before, after = sums.sum(dim=1, dtype=torch.float64).float().to(work).float().unbind(-1)
    ratio = (before / after).to(work).float()
    return torch.where((before >= 1e-7) & (after >= 1e-7), ratio, torch.ones_like(ratio))


def _cutoff_rescale_factors(base, experts, cuts: list[tuple[int, int, int, int]], largest: bool) -> torch.Tensor:
    """The same factors for the cut-off modes (TIES's and breadcrumbs' rescale), their keep rule known up
    front: the norms are torch's sums of |delta| and of the kept |delta|, as the reference and mergekit take
    them, so the factor is theirs bit for bit (csrc/cpu/rescale.cpp: cutoff_rescale_factors)."""
    factors = []
    for expert, (lo_t, lo_c, hi_t, hi_c) in zip(experts, cuts):
        delta = expert - base
        cut = functools.partial(torch.tensor, dtype=torch.int64)
        keep = cutoff_mask(delta, cut([hi_t, hi_c]), largest) & ~cutoff_mask(delta, cut([lo_t, lo_c]), largest)
        kept = delta * keep.to(delta.dtype)
        if rescale_in_fp32(delta, kept, drawn=False):
            delta, kept = delta.float(), kept.float()
        factor = l1_rescale_factor(delta, kept)
        factors.append(1.0 if factor is None else float(factor))
    return torch.tensor(factors, dtype=torch.float32, device=base.device)


modes = (NONE, MAGNITUDE, RANDOM, OUTLIERS)  # DELLA (RANK) stays with the reference

@_on_tensor_device
def merge_task_vectors(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float], mode: int,
                       counts_lo: list[int], counts_hi: list[int], densities: list[float], epsilons: list[float],
                       consensus: bool, normalize: bool, rescale: bool, lambda_: float, key0: int,
                       key1: int) -> torch.Tensor:
    """Fused sparsify + weight + (sign election, disjoint mean) + lambda + base, one pass; arguments as
    the C++ module's (merge_engine.ops.consensus._merge_with builds them). epsilons serve DELLA only."""
    if mode == RANK:
        raise NotImplementedError("merge_engine Triton kernels: DELLA (rank) runs on the PyTorch reference")
    if mode not in (NONE, MAGNITUDE, RANDOM, OUTLIERS):
        raise ValueError(f"merge_engine: unknown sparsification mode {mode}")
    _check_inputs(base, experts)
    k, n = len(experts), base.numel()
    if len(weights) != k or len(densities) != k:
        raise ValueError("merge_engine: one weight and density per expert")
    if mode in (MAGNITUDE, OUTLIERS) and (len(counts_lo) != k or len(counts_hi) != k):
        raise ValueError("merge_engine: one (lo, hi) selection count per expert")
    check_finite(base, "the base")
    for i, expert in enumerate(experts):
        check_finite(expert, f"expert {i}")
    if n == 0 or k == 0:
        return base.clone()
    out = torch.empty_like(base)
    device = base.device
    rounded = torch.tensor(weights, dtype=base.dtype).float()  # as torch.tensor(weights, dtype=dtype)
    cuts = [(NOTHING_LARGEST, 0, NOTHING_LARGEST, 0)] * k  # unused outside magnitude / outliers
    if mode in (MAGNITUDE, OUTLIERS):
        for i, expert in enumerate(experts):
            (lo_t, lo_c), (hi_t, hi_c) = _cutoffs(base, expert, [counts_lo[i], counts_hi[i]], mode == MAGNITUDE)
            cuts[i] = (lo_t, lo_c, hi_t, hi_c)
    probs = torch.tensor(densities, dtype=torch.float32, device=device)
    pointers = torch.tensor([e.data_ptr() for e in experts], dtype=torch.int64, device=device)
    key0, key1 = key0 & 0xFFFFFFFF, key1 & 0xFFFFFFFF
    cut_lanes = torch.tensor(cuts, dtype=torch.int64, device=device)
    if not rescale or mode == NONE:
        factors = torch.ones(k, dtype=torch.float32, device=device)
    elif mode == RANDOM:
        factors = _rescale_factors(base, pointers, cut_lanes, probs, mode, key0, key1)
    else:
        factors = _cutoff_rescale_factors(base, experts, cuts, mode == MAGNITUDE)
    unscaled = torch.tensor([not _rescaled(mode, d) for d in densities], device=device)
    factors = factors.masked_fill(unscaled, 1.0)
    # plain mean's divisor: the rounded weights summed in fp32 in order, rounded to the dtype; 1 where |d| < 1e-8
    # compared in the dtype, as torch compares the reference's (fp16's 1e-8 is 0: a zero sum stays)
    divisor = torch.zeros((), dtype=torch.float32)
    for w in rounded:
        divisor += w
    divisor = float(divisor.to(base.dtype))
    divisor = 1.0 if abs(divisor) < float(torch.tensor(1e-8, dtype=base.dtype)) else divisor
    lam = float(torch.tensor(lambda_, dtype=torch.float32))  # exactly representable: passed unchanged
    _merge_kernel[(triton.cdiv(n, BLOCK),)](
        base, pointers, out, rounded.to(device), cut_lanes, probs, factors, n, k, divisor, lam, key0, key1,
        MODE=mode, CONSENSUS=consensus, NORMALIZE=normalize, BLOCK=BLOCK, **_IEEE)
    # the reference's NaN factor (Inf / Inf: a kept delta that overflowed the dtype) makes all of that expert's
    # deltas NaN, and every merged value with them (a sign election would drop them here)
    return out.masked_fill_(factors.isnan().any(), float("nan"))


def _rescaled(mode: int, density: float) -> bool:
    """Whether the reference rescales an expert: not where it returns the delta whole (density >= 1) or zeros
    (TIES's density <= 0), where an overflowed delta must not make the factor NaN (csrc/cpu/rescale.cpp)."""
    return density < 1 and (density > 0 or mode in (RANDOM, OUTLIERS))
