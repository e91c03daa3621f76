"""The task-vector kernels of every backend (C++ CPU csrc/cpu/task_vectors.cpp, CUDA
csrc/cuda/task_vectors.cu, Triton triton_kernels/task_vectors.py): the properties all three share,
against the PyTorch references, exactly. Magnitude cut-offs must equal the reference's (key, index)
pairs for every count, out-of-range ones included; merges of all-zero deltas must give the base; DARE
keep masks must be the reference's draws, bit for bit; TIES's and breadcrumbs' rescaled merges must be the
reference's. The other merged values' bounds differ per backend
(summation orders): tests/csrc/test_cpu_kernels.py, tests/csrc/test_cuda_kernels.py and
tests/triton_kernels/test_task_vectors.py hold them.

Cut-off cases: (dtype, size, ties) over a pairwise covering set, each for the largest and the smallest
magnitudes; sizes SIZES (one element, under a 16-lane vector, 16-lane tails, 2-D), and for CUDA one
of 300007 elements (many blocks). The C++ kernel samples every element of tensors this small; its
bracketed select on sampled tensors is tested in tests/csrc/test_cpu_kernels.py.
"""
import torch

from merge_engine.ops.consensus import _merge_with, merge_task_vectors_reference
from merge_engine.ops.random import philox_key, uniform
from merge_engine.ops.select import magnitude_cutoff_reference
from tests.conftest import DTYPES, SIZES, pairwise, seed_of
from tests.csrc.kernel_checks import make_inputs, spread_values, weighted_contributions
from tests.kernels.conftest import on, per_backend

FAMILY = "task_vectors"

CUTOFF_SIZES = {"cpu": SIZES, "cuda": SIZES + [(300_007,)], "triton": SIZES}


def inputs(backend, *args, **kwargs):
    base, experts = make_inputs(*args, **kwargs)
    return backend.put(base), backend.put(experts)


@per_backend("dtype, shape, ties", {name: pairwise(DTYPES, sizes, [False, True]) for name, sizes in CUTOFF_SIZES.items()})
def test_delta_cutoffs_match_reference(backend, dtype, shape, ties):
    seed = seed_of("cutoffs", shape, ties, dtype)
    base, (expert,) = inputs(backend, shape, dtype, 1, seed, ties=ties)
    delta = (expert - base).cpu()
    n = delta.numel()
    counts = sorted({0, 1, 2, max(1, n // 100), n // 3, n // 2, n - 1, n, n + 5, -3})
    for largest in (True, False):
        got = backend.module.delta_cutoffs(base, expert, counts, largest)
        assert got.shape == (len(counts), 2) and got.dtype == torch.int64
        want = torch.stack([magnitude_cutoff_reference(delta, c, largest) for c in counts])
        assert torch.equal(got.cpu(), want), f"seed {seed}, largest {largest}, counts {counts}:\n{got}\n{want}"


@per_backend("dtype", {name: [(dtype,) for dtype in DTYPES] for name in CUTOFF_SIZES})
def test_delta_cutoffs_of_all_zero_deltas(backend, dtype):
    base, (expert,) = inputs(backend, (4097,), dtype, 1, 0, zero_delta=True)
    counts = [0, 1, 1024, 1025, 4096, 4097]
    for largest in (True, False):
        want = torch.stack([magnitude_cutoff_reference((expert - base).cpu(), c, largest) for c in counts])
        assert torch.equal(backend.module.delta_cutoffs(base, expert, counts, largest).cpu(), want)


# the Triton kernels leave DELLA's ranks ("rank") to the reference
MODES = {"cpu": ["", "magnitude", "random", "outliers", "rank"], "cuda": ["", "magnitude", "random", "outliers", "rank"],
         "triton": ["", "magnitude", "random", "outliers"]}


@per_backend("sparsify", {name: [(mode,) for mode in modes] for name, modes in MODES.items()})
def test_all_zero_deltas_give_the_base(backend, sparsify):
    base, experts = inputs(backend, (1023,), torch.bfloat16, 3, 7, zero_delta=True)
    kw = dict(weights=[1.0] * 3, densities=[0.5] * 3, sparsify=sparsify, consensus=True, normalize=True,
              rescale=True, gammas=[0.01] * 3, epsilons=[0.1] * 3)
    got = _merge_with(backend.module, base, experts, **kw)
    assert got.device.type == backend.device
    assert torch.equal(got, base)
    assert torch.equal(got.cpu(), merge_task_vectors_reference(base.cpu(), [e.cpu() for e in experts], **kw))


# K = 2 (no other sum's order can matter); sizes past torch's 32768-element grain (a sum split over its
# threads) on the compiled backends, interpreter-sized for Triton
RESCALE_SIZES = {"cpu": [(37,), (211, 333)], "cuda": [(37,), (211, 333), (300_007,)], "triton": [(37,), (37, 53)]}


@per_backend("dtype, sparsify, shape", {name: pairwise(DTYPES, ["magnitude", "outliers"], sizes)
                                        for name, sizes in RESCALE_SIZES.items()})
def test_cutoff_rescale_identical_to_reference(backend, dtype, sparsify, shape):
    """TIES's and breadcrumbs' `rescale: true`: the L1 factor's norms are torch's sums of |delta| and of
    the kept |delta| on the tensors' device, as the reference (and mergekit) take them, so the merge is the
    reference's bit for bit."""
    seed = seed_of("cutoff rescale", shape, sparsify, dtype)
    base, experts = inputs(backend, shape, dtype, 2, seed)
    kw = dict(weights=[0.7, 0.4], densities=[0.3, 0.6], sparsify=sparsify, consensus=True, normalize=False,
              rescale=True, lambda_=1.1, gammas=[0.02, 0.1] if sparsify == "outliers" else None)
    got = _merge_with(backend.module, base, experts, **kw)
    want = merge_task_vectors_reference(base, experts, **kw)
    assert torch.equal(got, want), f"seed {seed}: {int((got != want).sum())} elements differ"


@per_backend("sparsify", {name: [(mode,) for mode in modes if mode] for name, modes in MODES.items()})
def test_fp16_rescale_past_the_fp16_range(backend, sparsify):
    """|delta| ~ 3 over 40000 fp16 elements: L1 norms past fp16's 65504, which the reference takes in fp32
    (ops/sparsify.py: rescale_in_fp32). Every backend's merge is finite. The cut-off modes' norms are torch's
    sums, so the merge is the reference's bit for bit; the drawn modes' fp32 norms are sums in each kernel's
    order (a relative difference of about 1e-6 in the factor), so a rescaled delta may round to the other
    neighbouring fp16 value: one fp16 rounding of each weighted delta, of the two experts' sum and of the base
    added, at most 4 units of fp16 roundoff (2^-11) of |base| + sum_i |w_i kept_i| (fp64)."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(40_000, generator=g).half()
    experts = [(base.float() + 3 * torch.randn(40_000, generator=g)).half() for _ in range(2)]
    kw = dict(weights=[0.7, 0.4], densities=[0.3, 0.6], sparsify=sparsify, consensus=True, normalize=False,
              rescale=True, gammas=[0.02, 0.02], epsilons=[0.1, 0.1], seed=5, tensor_name="w")
    got = _merge_with(backend.module, backend.put(base), backend.put(experts), **kw).cpu()
    want = merge_task_vectors_reference(base, experts, **kw)
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    if sparsify in ("magnitude", "outliers"):
        assert torch.equal(got, want), f"{int((got != want).sum())} elements differ"
        return
    _, total = weighted_contributions(base, experts, kw)
    bound = 4 * 2.0 ** -11 * (base.double().abs() + total)
    assert ((got.double() - want.double()).abs() <= bound).all()


@per_backend("dtype, sparsify", {name: pairwise(DTYPES, modes) for name, modes in MODES.items()})
def test_values_from_subnormal_to_large_merge_as_the_reference(backend, dtype, sparsify):
    """Inputs of every magnitude class of their dtype (subnormals, signed zeros, large values: spread_values)
    give the reference's cut-offs and merge, bit for bit (K = 2 and no rescale: no sum's order can matter):
    no backend flushes a subnormal input, delta or result to zero."""
    seed = seed_of("spread values", dtype, sparsify)
    g = torch.Generator().manual_seed(seed)
    base, experts = spread_values((1023,), dtype, g), [spread_values((1023,), dtype, g) for _ in range(2)]
    assert (base.double().abs() < torch.finfo(dtype).tiny).sum() > 50  # subnormal (or zero) inputs
    delta = experts[0] - base
    counts = [1, 100, 511, 1000]
    want = torch.stack([magnitude_cutoff_reference(delta, c, True) for c in counts])
    assert torch.equal(backend.module.delta_cutoffs(backend.put(base), backend.put(experts[0]), counts, True).cpu(),
                       want), f"seed {seed}"
    kw = dict(weights=[0.7, 0.4], densities=[0.3, 0.6], sparsify=sparsify, consensus=True, normalize=True,
              gammas=[0.05, 0.05], epsilons=[0.1, 0.1], seed=seed, tensor_name="w")
    got = _merge_with(backend.module, backend.put(base), backend.put(experts), **kw).cpu()
    want = merge_task_vectors_reference(base, experts, **kw)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()), \
        f"seed {seed}: {int((got != want).sum())} elements differ"


@per_backend("dtype, sparsify", {name: pairwise(DTYPES, ["", "magnitude"]) for name in MODES})
def test_plain_mean_of_weights_summing_to_zero(backend, dtype, sparsify):
    """normalize without consensus divides by the sum of the weights in the dtype, taken as 1 where |sum| < 1e-8
    compared in the dtype, as torch compares the reference's (and mergekit's) sum with 1e-8: fp16's 1e-8 is 0,
    so an fp16 sum of 0 divides by 0 (Inf, or NaN where the deltas cancel too), where bf16 and fp32 divide by 1."""
    base, experts = inputs(backend, (1023,), dtype, 2, 4)
    kw = dict(weights=[0.75, -0.75], densities=[0.5, 0.5], sparsify=sparsify, normalize=True)
    got = _merge_with(backend.module, base, experts, **kw).cpu()
    want = merge_task_vectors_reference(base.cpu(), [e.cpu() for e in experts], **kw)
    assert torch.isfinite(want).all() == (dtype != torch.float16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan]), f"{int((got != want).sum())} differ"


@on()
def test_dare_masks_identical_to_reference(backend):
    # weights 1, 2, 4 on all-one deltas: bit i of the (exact) sum is expert i's keep flag
    n, densities = 4097, [0.3, 0.6, 0.9]
    base = torch.zeros(n)
    experts = [torch.ones(n)] * 3
    for seed in (0, 1, 12345):
        kw = dict(weights=[1.0, 2.0, 4.0], densities=densities, sparsify="random", seed=seed, tensor_name="x")
        merged = _merge_with(backend.module, backend.put(base), backend.put(experts), **kw).cpu()
        assert torch.equal(merged, merge_task_vectors_reference(base, experts, **kw)), f"seed {seed}"
        got = merged.to(torch.int64)
        key = philox_key(seed, "x")
        for i, density in enumerate(densities):
            want = uniform(n, key, i) < torch.tensor(density, dtype=torch.float32)
            assert torch.equal((got >> i & 1).bool(), want), f"seed {seed}, expert {i}"



@per_backend("consensus", {name: [(False,), (True,)] for name in MODES})
def test_a_dropped_overflowed_delta_adds_nothing(backend, consensus):
    # 60000 - (-60000) overflows float16, and breadcrumbs ("outliers") always drops the largest magnitude: the
    # reference, as mergekit, multiplies the Inf by 0 there and gets NaN; every kernel adds +0 for a dropped
    # delta, so the element is the base plus the other expert's part: the reference's for a delta of 0 there.
    base, experts = make_inputs((100,), torch.float16, 2, 5)
    base[3], experts[0][3] = -60000.0, 60000.0
    kw = dict(weights=[1.0, 0.5], densities=[0.8, 0.8], sparsify="outliers", consensus=consensus, normalize=True,
              gammas=[0.05, 0.05])
    got = _merge_with(backend.module, backend.put(base), backend.put(experts), **kw).cpu()
    want = merge_task_vectors_reference(base, experts, **kw)
    assert want.isnan().nonzero().flatten().tolist() == [3]
    others = torch.arange(100) != 3
    assert torch.equal(got[others], want[others])
    zero_delta = experts[0].clone()
    zero_delta[3] = base[3]
    assert torch.equal(got[3], merge_task_vectors_reference(base, [zero_delta, experts[1]], **kw)[3])


OVERFLOW_CASES = [(torch.bfloat16, "magnitude", False), (torch.bfloat16, "outliers", True),
                  (torch.float16, "magnitude", True), (torch.float16, "outliers", False)]


@per_backend("dtype, sparsify, consensus", {name: OVERFLOW_CASES for name in MODES})
def test_a_kept_overflowed_delta_makes_the_rescaled_merge_nan(backend, dtype, sparsify, consensus):
    # 3e38 - (-3e38) overflows bfloat16 (60000 - (-60000) float16), and both TIES and breadcrumbs with gamma 0 keep
    # the largest magnitude: both L1 norms are Inf, the reference's (mergekit's) factor Inf / Inf is NaN, and so
    # is every merged value, sign election or not. An expert at density 1 is not rescaled: its Inf stays one Inf.
    big = 3e38 if dtype == torch.bfloat16 else 60000.0
    base, experts = make_inputs((100,), dtype, 2, 6)
    base[3], experts[0][3] = -big, big
    for densities in ([0.5, 0.5], [1.0, 0.5]):
        kw = dict(weights=[1.0, 0.5], densities=densities, sparsify=sparsify, consensus=consensus, normalize=True,
                  rescale=True, gammas=[0.0, 0.0])
        got = _merge_with(backend.module, backend.put(base), backend.put(experts), **kw).cpu()
        want = merge_task_vectors_reference(base, experts, **kw)
        assert want.isnan().all() if densities[0] < 1 else want.isinf().nonzero().flatten().tolist() == [3]
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan]), f"densities {densities}"
