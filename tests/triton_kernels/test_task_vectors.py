"""The Triton kernels (triton_kernels/task_vectors.py) against the PyTorch references: through the
Triton interpreter on CPU tensors (TRITON_INTERPRET=1, as tools/test.sh sets), or on a GPU.

Merged values must match exactly (cut-offs, DARE masks and all-zero deltas: with the other backends'
in tests/kernels/test_task_vectors.py). The kernel sums over experts in fp32 in
expert order; torch's dim-0 sums do the same for K <= 4, and for bf16/fp16 at any K (fp32 sums of
more than 4 rows are re-associated, measured on torch 2.13 CPU), so the K = 8 case runs in bf16.
Only DARE's L1 rescale factor may differ (see assert_rescaled_close); the cut-off modes' factor comes
from torch's own sums, as the reference's. The interpreter is slow: inputs
stay small, a few thousand elements, which still spans several 1024-element blocks.

The GPU lowering is checked without a GPU too (as the other families' kernels): the merge and L1 kernels,
compiled for sm_80 and sm_90 in every dtype and mode, round every operation to nearest and flush no subnormals.

Inputs are seeded from the test parameters (zlib.crc32 of their repr, stable across runs); every
assertion message names the seed.
"""
import os
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from merge_engine.ops import backends  # noqa: E402
from merge_engine.ops.consensus import _merge_with, merge_task_vectors_reference  # noqa: E402
from merge_engine.ops.select import magnitude_cutoff_reference  # noqa: E402
from merge_engine.triton_kernels import task_vectors as tv  # noqa: E402
from tests.conftest import DTYPES, MANTISSA, SIZES, pairwise, seed_of, ulp  # noqa: E402
from tests.triton_kernels.gpu_lowering import check_ieee_rounding, ptx_float_ops  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def make_inputs(shape, dtype, k, seed, ties=False, zero_delta=False):
    """Base and k experts; ties: deltas from a few levels (long runs of equal magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if ties:
        base = base.round()
    experts = []
    for _ in range(k):
        if ties:
            noise = torch.randint(-3, 4, shape, generator=g).float() * 0.125
        else:
            noise = torch.randn(shape, generator=g) * 0.1
        experts.append(base.clone() if zero_delta else base + noise)
    return base.to(DEVICE, dtype), [e.to(DEVICE, dtype) for e in experts]


def merge_kwargs(k, sparsify, consensus, normalize, rescale=False, density=None, seed=0):
    return dict(weights=[0.3 + 0.4 * i for i in range(k)],
                densities=[density if density is not None else 0.2 + 0.2 * i for i in range(k)],
                sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale, lambda_=0.9,
                gammas=[0.05] * k if sparsify == "outliers" else None, seed=seed, tensor_name="t")


def test_empty_tensors():
    base = torch.empty(0, device=DEVICE)
    for largest in (True, False):
        want = torch.stack([magnitude_cutoff_reference(base.cpu(), c, largest) for c in (0, 3)])
        assert torch.equal(tv.delta_cutoffs(base, base, [0, 3], largest), want)
    kw = merge_kwargs(1, "magnitude", True, True)
    assert _merge_with(tv, base, [base], **kw).shape == (0,)


CASES = [  # (sparsify, consensus, normalize)
    ("", False, True), ("", True, False),
    ("magnitude", True, True), ("magnitude", False, False),
    ("random", True, False), ("random", False, True),
    ("outliers", False, False), ("outliers", True, True),
]


# every case on every size and in every dtype: a pairwise covering set (K from the size and case: 1 to 4)
@pytest.mark.parametrize("dtype, shape, case", pairwise(DTYPES, SIZES, CASES))
def test_merge_matches_reference_exactly(dtype, shape, case):
    k = 1 + (SIZES.index(shape) + CASES.index(case)) % 4
    seed = seed_of(shape, case, dtype)
    base, experts = make_inputs(shape, dtype, k, seed)
    kw = merge_kwargs(k, *case, seed=seed)
    got, want = _merge_with(tv, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw)
    assert torch.equal(got, want), f"seed {seed}, k {k}: {int((got != want).sum())} elements differ"


def assert_rescaled_close(got, want, base, context):
    """|got - want| <= 4 ulp(|want|) + 2^-(m-2) |want - base| (m mantissa bits).

    DARE's L1 rescale factor is a ratio of two whole-tensor sums, which the kernel takes in another
    order than torch (fp32 block sums added in fp64, against torch's fp32 cascade), so after rounding
    to the dtype it may differ by an ulp or two (<= 2^-m relative each). That relative error carries
    through the products and the mean to the mixed value, want - base up to lambda and the last
    rounding, and may flip the roundings on the way by an ulp: 2^-(m-2) |want - base| holds four such
    ulps, and 4 ulp(|want|) the final roundings where base and the mixed value cancel. The bound is
    relative to the mixed value, so it needs consensus: the agreeing deltas share a sign and cannot
    cancel, while a plain weighted sum can, leaving an error relative to its terms, not to it. (An
    elected sign could still flip where the sum is within that error of zero; these inputs have none.)"""
    m = MANTISSA[want.dtype] - 1  # stored bits
    g, w, b = got.double(), want.double(), base.double()
    excess = (g - w).abs() - (4 * ulp(w, want.dtype) + 2.0 ** -(m - 2) * (w - b).abs())
    assert (excess <= 0).all(), f"{context}: error exceeds the bound by {float(excess.max())}"


@pytest.mark.parametrize("dtype, shape, sparsify", pairwise(DTYPES, [(7,), (4097,), (37, 53)],
                                                            ["magnitude", "random", "outliers"]))
def test_rescaled_merge(dtype, shape, sparsify):
    """Identical to the reference for the cut-off modes (the factor from torch's sums), within
    assert_rescaled_close's bound for DARE."""
    k = 1 + [(7,), (4097,), (37, 53)].index(shape)
    seed = seed_of(shape, sparsify, dtype, "rescale")
    base, experts = make_inputs(shape, dtype, k, seed)
    kw = merge_kwargs(k, sparsify, True, True, rescale=True, seed=seed)
    got, want = _merge_with(tv, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw)
    if sparsify == "random":
        assert_rescaled_close(got, want, base, f"seed {seed}, k {k}")
    else:
        assert torch.equal(got, want), f"seed {seed}, k {k}: {int((got != want).sum())} elements differ"


@pytest.mark.parametrize("density", [0.0, 1e-4, 1.0])
@pytest.mark.parametrize("sparsify", ["magnitude", "random", "outliers"])
def test_densities_with_many_equal_magnitudes(density, sparsify):
    seed = seed_of(density, sparsify)
    base, experts = make_inputs((4097,), torch.bfloat16, 3, seed, ties=True)
    kw = merge_kwargs(3, sparsify, True, True, density=density, seed=seed)
    got, want = _merge_with(tv, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw)
    assert torch.equal(got, want), f"seed {seed}: {int((got != want).sum())} elements differ"


def test_eight_experts():
    seed = seed_of("eight experts")
    base, experts = make_inputs((4097,), torch.bfloat16, 8, seed, ties=True)
    kw = merge_kwargs(8, "magnitude", True, True, density=0.3, seed=seed)
    got, want = _merge_with(tv, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw)
    assert torch.equal(got, want), f"seed {seed}: {int((got != want).sum())} elements differ"


def test_a_tie_index_at_2_31_does_not_wrap():
    """The last block of a 2**31-element tensor starts below 2**31 (a 32-bit argument), and the index just past its
    last element is 2**31: in 32 bits it wrapped, and the cut-off's tie index came back 0. The base and the expert
    are two views of one 4 GiB buffer, one block apart; only the blocks the kernel reads are written (the rest is
    never touched, so on the CPU it takes no memory)."""
    n, block = 2**31, tv.BLOCK
    memory = torch.empty(n + block, dtype=torch.float16, device=DEVICE)
    base, expert = memory[:n], memory[block:]
    memory[n - block:] = 0
    memory[-1] = 1  # expert[n - 1]: the only key 0x3C00 (1.0) of the last block
    out = torch.empty(1, dtype=torch.int64, device=DEVICE)
    tv._nth_equal_kernel[(1,)](base, expert, out, n, 0x3C00, n - block, 1, BLOCK=block, **tv._IEEE)
    assert int(out) == n


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_cutoff_op_on_the_gpu_takes_this_select(monkeypatch, dtype):
    """The op's GPU kernel (ops/select.py) on this backend: the reference's cut-offs, many tied magnitudes."""
    from merge_engine.ops import select
    monkeypatch.setattr(backends, "gpu_backend", lambda family="task_vectors": tv)
    g = torch.Generator().manual_seed(seed_of("magnitude_cutoff op", dtype))
    x = (torch.randint(-4, 5, (3001,), generator=g).float() * 0.25).to(DEVICE, dtype)
    for largest in (True, False):
        for count in (0, 1, 1000, 2999, 3001):
            want = magnitude_cutoff_reference(x.cpu(), count, largest)
            assert torch.equal(select._magnitude_cutoff_cuda(x, count, largest).cpu(), want), (largest, count)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_errors(bad):
    base, experts = make_inputs((100,), torch.float32, 2, 3)
    experts[1][17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        _merge_with(tv, base, experts, [1.0, 1.0], [0.5, 0.5], "magnitude", True, True)
    if bad != bad:  # NaN
        with pytest.raises(ValueError, match="the expert has 1 NaN"):
            tv.delta_cutoffs(base, experts[1], [10], True)
    else:  # an Inf expert value is an Inf magnitude (ops/select.py)
        want = magnitude_cutoff_reference(experts[1] - base, 10, True)
        assert tv.delta_cutoffs(base, experts[1], [10], True)[0].tolist() == want.tolist()
    with pytest.raises(ValueError, match="the base has 1 NaN or Inf"):
        tv.delta_cutoffs(experts[1], base, [10], True)


def test_rank_mode_is_left_to_the_reference():
    base, experts = make_inputs((10,), torch.float32, 1, 0)
    with pytest.raises(NotImplementedError):
        tv.merge_task_vectors(base, experts, [1.0], 4, [0], [10], [0.5], [0.1], True, True, False, 1.0, 0, 0)


def test_backend_is_the_triton_module(monkeypatch):
    monkeypatch.setenv("MERGE_ENGINE_KERNELS", "1")
    backends.triton_backend.cache_clear()
    try:
        assert backends.triton_backend() is tv
    finally:
        backends.triton_backend.cache_clear()


def test_missing_triton_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("MERGE_ENGINE_KERNELS", "1")
    # a fresh import of the kernels module, with `import triton` raising ImportError
    monkeypatch.delattr(sys.modules["merge_engine.triton_kernels"], "task_vectors")
    monkeypatch.delitem(sys.modules, "merge_engine.triton_kernels.task_vectors")
    monkeypatch.setitem(sys.modules, "triton", None)
    backends.triton_backend.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="Triton kernels unavailable") as record:
            assert backends.triton_backend() is None
            assert backends.triton_backend() is None
        assert len(record) == 1
    finally:
        backends.triton_backend.cache_clear()


# Per (arch, dtype, kernel and flags): its PTX floating-point and conversion instructions (gpu_lowering.py).
COMPILE_FOR_GPUS = r"""
from merge_engine.triton_kernels import task_vectors as tv
for arch in (80, 90):
    for dt in ("fp32", "bf16", "fp16"):
        merge = dict(base_ptr=f"*{dt}", experts_ptr="*i64", out_ptr=f"*{dt}", weights_ptr="*fp32", cuts_ptr="*i64",
                     probs_ptr="*fp32", factors_ptr="*fp32", n="i64", K="i32", divisor="fp32", lambda_="fp32",
                     key0="i64", key1="i64", MODE="constexpr", CONSENSUS="constexpr", NORMALIZE="constexpr",
                     BLOCK="constexpr")
        for mode in (0, 1, 2, 3):
            for consensus in (False, True):
                flags = dict(MODE=mode, CONSENSUS=consensus, NORMALIZE=True, BLOCK=tv.BLOCK)
                found[f"sm_{arch} {dt} merge {flags}"] = ptx_ops(tv._merge_kernel, merge, flags, tv._IEEE, arch, FLOAT_OPS)
        l1 = dict(base_ptr=f"*{dt}", experts_ptr="*i64", sums_ptr="*fp32", cuts_ptr="*i64", probs_ptr="*fp32", n="i64",
                  key0="i64", key1="i64", MODE="constexpr", BLOCK="constexpr")
        for mode in (1, 2, 3):
            flags = dict(MODE=mode, BLOCK=tv.BLOCK)
            found[f"sm_{arch} {dt} l1 {flags}"] = ptx_ops(tv._l1_kernel, l1, flags, tv._IEEE, arch, FLOAT_OPS)
"""


def test_kernels_lower_to_ieee_ptx_for_sm80_and_sm90():
    """Every fp32 (and fp16) add, multiply and divide rounds to nearest (.rn: no fused multiply-add, an IEEE
    division), no instruction flushes subnormals (.ftz), and narrowing conversions round to nearest; an fp16
    operation (f16, f16x2) rounds as torch's fp32 one rounded to fp16 does (fp32 carries 2 p + 2 bits of fp16's p)."""
    found = ptx_float_ops(COMPILE_FOR_GPUS)
    assert len(found) == 2 * 3 * (8 + 3)
    check_ieee_rounding(found, "f32|f16|f16x2")
