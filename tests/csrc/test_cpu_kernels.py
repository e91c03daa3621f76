"""The C++ CPU kernels (csrc/cpu) against the PyTorch references, on fresh random inputs.

Cut-offs, masks and DARE/DELLA draws must match exactly. Merged values: the kernel rounds to the
compute dtype wherever torch does and sums over the K experts in float, in expert order. torch's
dim-0 sums follow the same order for most elements, but its vectorised reduction may re-associate
a K-term sum for some elements (the scalar tail of a row); and the random and rank modes' L1 rescale
factor is a ratio of two whole-tensor sums taken in a different order (the cut-off modes' takes
torch's own sums, as the reference and mergekit do). So values are compared:
- exactly where the order cannot matter: K <= 2 (two-term sums commute) and no rescale, or a
  rescale of the cut-off modes;
- otherwise within  2 ulp_D(|ref|) + lambda * (2^-(p-3) + 2K * 2^-24) * S / w_min,  where D is the
  dtype with p mantissa bits, S = sum_i |w_i * sparsified delta_i| (fp64), w_min the smallest weight
  (the smallest possible divisor; 1 without normalisation): one rounding of the mixed value and of
  the output, up to 2 ulps of rescale factor error, and the re-association error of K-term fp32 sums;
- an elected sign may differ only where the fp64 sum of the weighted deltas is within that
  re-association error of zero (the election is numerically arbitrary there), and such elements are
  excluded from the value check.
"""
import os
import subprocess
import sys
import zlib

import pytest
import torch

from merge_engine import ops
from merge_engine.ops import backends
from merge_engine.ops.consensus import _merge_with, merge_task_vectors_reference, selection_counts
from merge_engine.ops.select import magnitude_cutoff_reference
from tests.conftest import DTYPES, MANTISSA, SIZES, pairwise, ulp
from tests.csrc.kernel_checks import make_inputs, weighted_contributions

if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

pytestmark = pytest.mark.cpu_kernels


def assert_merged_close(got, want, base, experts, kw, context):
    dtype, k = base.dtype, len(experts)
    summed_factor = kw.get("rescale") and kw.get("sparsify") in ("random", "rank")  # not torch's sums
    if k <= 2 and not summed_factor:
        assert torch.equal(got, want), f"{context}: {(got != want).sum()} elements differ"
        return
    p = MANTISSA[dtype]
    signed, s = weighted_contributions(base, experts, kw)
    w_min = min(kw["weights"]) if kw.get("normalize") else 1.0
    reassociation = 2 * k * 2.0 ** -24 * s + (2.0 ** -(p - 2) * s if summed_factor else 0)
    undecided = signed.abs() <= reassociation  # the elected sign may legitimately differ here
    g, w = got.double(), want.double()
    bound = 2 * ulp(w, dtype) + abs(kw.get("lambda_", 1.0)) * (2.0 ** -(p - 3) + 2 * k * 2.0 ** -24) * s / w_min
    excess = torch.where(undecided, 0, (g - w).abs() - bound)
    assert (excess <= 0).all(), f"{context}: error exceeds the bound by {float(excess.max())}"


# The select's fast path (csrc/cpu/bracketed_select.cpp) samples runs of 32 elements
# (n / 128 of them, clamped to [512, 8192]) at these offsets to bracket each cut-off; it counts the
# tensor in chunks of 2^16 elements and lists the keys strictly inside the bracket, up to
# n / 16 + 2^16 of them. Sizes above runs * 32 sample.
SAMPLE_RUN, SELECT_CHUNK = 32, 1 << 16


def sample_runs(n):
    return min(max(n // (4 * SAMPLE_RUN), 512), 8192)


def sampled_positions(n):
    runs = sample_runs(n)
    starts = torch.arange(runs) * (n - SAMPLE_RUN) // (runs - 1)
    return (starts[:, None] + torch.arange(SAMPLE_RUN)).reshape(-1)


def bracket_inputs(case, n, dtype, seed):
    """(base, expert) whose deltas exercise one path of the bracketed select:
    smooth: distinct magnitudes, the cut-off falls among the listed keys;
    levels: a few magnitude levels, the cut-off key is a bracket end shared by ~1/7 of the elements;
    misleading: the sampled elements (a quarter) have zero deltas, the others not: the cut-offs above the
        lowest quarter are outside the bracket;
    crowded: the sample spreads over [0, 1], the rest crowds into [0.49, 0.51]: the list outgrows its budget."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    if case == "smooth":
        delta = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    elif case == "levels":
        base = base.round()
        delta = torch.randint(-3, 4, (n,), generator=g).double() * 0.125
    elif case == "misleading":
        delta = torch.randn(n, generator=g, dtype=torch.float64) + 0.5
        delta[sampled_positions(n)] = 0
    else:
        base = torch.zeros(n, dtype=torch.float64)
        delta = 0.49 + 0.02 * torch.rand(n, generator=g, dtype=torch.float64)
        delta[sampled_positions(n)] = torch.rand(sample_runs(n) * SAMPLE_RUN, generator=g, dtype=torch.float64)
    base = base.to(dtype)
    return base, (base.double() + delta).to(dtype)


# four chunks, the last one partial (sampled: n / 128 runs); and 17 chunks, with the run count at its cap
BRACKET_SIZES = [(n, dtype) for dtype in DTYPES for n in (3 * SELECT_CHUNK + 4099,)] + \
    [(16 * SELECT_CHUNK + 4099, torch.bfloat16)]


# every path (case) on every size and dtype, and in both directions: a pairwise covering set
@pytest.mark.parametrize("n, dtype, case, largest", [(n, dtype, case, largest) for (n, dtype), case, largest in pairwise(
    BRACKET_SIZES, ["smooth", "levels", "misleading", "crowded"], [True, False])])
def test_bracketed_select_matches_reference(ext, n, dtype, case, largest):
    if n > 3 * SELECT_CHUNK + 4099:
        assert sample_runs(n) == 8192  # the capped sample
    seed = zlib.crc32(repr((case, largest, dtype, n)).encode()) % 10**6
    base, expert = bracket_inputs(case, n, dtype, seed)
    delta = expert - base
    keys = delta.view(torch.int16 if dtype.itemsize == 2 else torch.int32).long() & (0x7FFF if dtype.itemsize == 2 else 0x7FFFFFFF)
    if case == "misleading":  # the construction defeats the sample: it sees only zero keys
        assert (keys[sampled_positions(n)] == 0).all() and (keys > 0).float().mean() > 0.7
    if case == "crowded":  # more keys fall inside any bracket around the middle than the list may hold
        inside = ((delta.double().abs() > 0.48) & (delta.double().abs() < 0.52)).sum()
        assert inside > n // 16 + SELECT_CHUNK
    counts = [1, n // 1000, n // 10, n // 3, n // 2, (4 * n) // 5, n - 7]
    got = ext.delta_cutoffs(base, expert, counts, largest)
    for j, count in enumerate(counts):
        want = magnitude_cutoff_reference(delta, count, largest)
        assert got[j].tolist() == want.tolist(), f"seed {seed}, count {count}"
    # the fused merge applies these cut-offs: TIES of two experts is bit-identical to the reference
    kw = dict(weights=[0.6, 0.4], densities=[0.3, 0.7], sparsify="magnitude" if largest else "outliers",
              consensus=True, normalize=True, gammas=[0.01, 0.01] if not largest else None)
    experts = [expert, base + (expert - base) * -0.5]
    assert torch.equal(_merge_with(ext, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw))


CASES = [  # (sparsify, consensus, normalize, rescale)
    ("", False, True, False), ("", False, False, False),
    ("magnitude", True, True, False), ("magnitude", True, True, True),
    ("random", True, False, False), ("random", False, False, True),
    ("outliers", False, False, False), ("outliers", True, False, False),
    ("rank", True, True, False), ("rank", False, False, True),
]


# every case on every size and in every dtype (a pairwise covering set; K follows the size: 1, 3, 3, 1, 4)
@pytest.mark.parametrize("dtype, shape, case", pairwise(DTYPES, SIZES, CASES))
def test_merge_matches_reference(ext, dtype, shape, case):
    sparsify, consensus, normalize, rescale = case
    k = 1 + (len(shape) * 3 + shape[0]) % 4
    seed = zlib.crc32(repr((shape, case, dtype)).encode()) % 10**6
    base, experts = make_inputs(shape, dtype, k, seed)
    kw = dict(weights=[0.3 + 0.4 * i for i in range(k)], densities=[0.2 + 0.2 * i for i in range(k)],
              sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale, lambda_=0.9,
              gammas=[0.05] * k if sparsify == "outliers" else None,
              epsilons=[0.1] * k if sparsify == "rank" else None, seed=seed, tensor_name="t")
    got = _merge_with(ext, base, experts, **kw)
    want = merge_task_vectors_reference(base, experts, **kw)
    assert_merged_close(got, want, base, experts, kw, f"seed {seed}, k {k}")


@pytest.mark.parametrize("dtype, k, density", pairwise(DTYPES, [1, 2, 5, 8], [0.0, 1e-4, 0.5, 1.0]))
def test_ties_many_experts_densities_and_ties(ext, dtype, k, density):
    seed = k * 100 + int(density * 1000)
    base, experts = make_inputs((4097,), dtype, k, seed, ties=True)
    kw = dict(weights=[1.0 - 0.1 * i for i in range(k)], densities=[density] * k, sparsify="magnitude",
              consensus=True, normalize=True)
    got, want = _merge_with(ext, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw)
    assert_merged_close(got, want, base, experts, kw, f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_della_ranks_runs_of_equal_magnitudes_by_index(ext, dtype):
    """DELLA's per-row ranks (a radix sort) on rows full of equal magnitudes: ties ranked by index, as
    the reference's stable sort ranks them, so keep probabilities and the merge are identical."""
    base, experts = make_inputs((9, 301), dtype, 2, 11, ties=True)
    kw = dict(weights=[0.6, 0.4], densities=[0.3, 0.7], sparsify="rank", consensus=True, normalize=True,
              epsilons=[0.2, 0.25], seed=3, tensor_name="t")
    got, want = _merge_with(ext, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw)
    assert torch.equal(got, want), f"{(got != want).sum()} elements differ"


@pytest.mark.parametrize("dtype", DTYPES)
def test_della_ranks_of_narrow_and_wide_rows(ext, dtype):
    """Both ways of ranking a row give the reference's stable ranks: counting (keys spanning few values:
    rows of similar magnitudes, with or without exact zeros) and the radix sort (keys spread over many
    binades, and float32 rows, whose keys span more than 8 * columns + 4096 values)."""
    g = torch.Generator().manual_seed(5)
    rows = 64
    base = torch.randn(rows, 257, generator=g, dtype=torch.float64)
    scale = torch.ones(rows, 257, dtype=torch.float64)
    scale[16:32] = 10.0 ** torch.randint(-30, 4, (16, 257), generator=g)  # wide: many binades
    delta = torch.randn(rows, 257, generator=g, dtype=torch.float64) * scale * 0.01
    delta[32:48, ::3] = 0  # narrow, with exact zeros far below the rest
    delta[48:52] = 0  # all zero
    base = base.to(dtype)
    experts = [(base.double() + delta).to(dtype), (base.double() - 0.5 * delta).to(dtype)]
    kw = dict(weights=[0.6, 0.4], densities=[0.3, 0.7], sparsify="rank", consensus=True, normalize=True,
              epsilons=[0.2, 0.25], seed=4, tensor_name="t")
    got, want = _merge_with(ext, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw)
    assert torch.equal(got, want), f"{(got != want).sum()} elements differ"


@pytest.mark.parametrize("sparsify, shape", [("rank", (301, 67)), ("random", (70001,)), ("random", (211, 333))])
def test_rescaled_merge_does_not_depend_on_the_thread_count(ext, sparsify, shape):
    """Work items go to threads in numbered chunks as threads free up (csrc/cpu/parallel.h) and the
    random and rank modes' L1 rescale sums are taken per chunk and added in chunk order, so the result is
    the same bits whichever thread ran which chunk and however many there were."""
    base, experts = make_inputs(shape, torch.float32, 3, 8)
    kw = dict(weights=[0.5, 0.3, 0.2], densities=[0.4, 0.6, 0.7], sparsify=sparsify, consensus=True, normalize=True,
              rescale=True, epsilons=[0.1] * 3 if sparsify == "rank" else None, seed=2, tensor_name="t")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_merge_with(ext, base, experts, **kw))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("dtype, sparsify, shape", pairwise(DTYPES, ["magnitude", "outliers"],
                                                          [(211, 333), (70001,), (37,)]))
def test_cutoff_rescale_factor_is_the_reference_s_at_every_thread_count(ext, dtype, sparsify, shape):
    """TIES's and breadcrumbs' rescale factor comes from torch's own sums of |delta| and of the kept
    |delta|, as the reference and mergekit take them: bit-identical to the reference at every thread count
    (torch splits a sum of more than 32768 elements over its threads, so the factor may depend on their
    number, in mergekit as in the reference), K = 2 so that no other sum's order matters."""
    base, experts = make_inputs(shape, dtype, 2, 9)
    kw = dict(weights=[0.7, 0.4], densities=[0.3, 0.6], sparsify=sparsify, consensus=True, normalize=False,
              rescale=True, lambda_=1.1, gammas=[0.02, 0.1] if sparsify == "outliers" else None)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got, want = _merge_with(ext, base, experts, **kw), merge_task_vectors_reference(base, experts, **kw)
            assert torch.equal(got, want), f"{n} threads: {(got != want).sum()} elements differ"
    finally:
        torch.set_num_threads(threads)


# at fault: the base, expert 0, expert 1; a pairwise covering set of (dtype, sparsify, at fault, value)
@pytest.mark.parametrize("dtype, sparsify, at_fault, bad", pairwise(
    DTYPES, ["magnitude", "random", ""], [0, 1, 2], [float("nan"), float("inf"), -float("inf")]))
def test_non_finite_inputs_are_errors(ext, dtype, sparsify, at_fault, bad):
    # the fused pass detects them through the deltas they make non-finite; the message names the input
    base, experts = make_inputs((100,), dtype, 2, 3)
    (base if at_fault == 0 else experts[at_fault - 1])[17] = bad
    name = "the base" if at_fault == 0 else f"expert {at_fault - 1}"
    with pytest.raises(ValueError, match=f"{name} has 1 NaN or Inf"):
        _merge_with(ext, base, experts, [1.0, 1.0], [0.5, 0.5], sparsify, True, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cutoffs_order_an_inf_expert_value_and_refuse_nan_or_an_inf_base(ext, dtype):
    base, (expert,) = make_inputs((300,), dtype, 1, 11)
    expert[[5, 200]] = float("inf")
    expert[77] = -float("inf")
    counts = [1, 2, 3, 4, 150, 297, 298]
    for largest in (True, False):
        got = ext.delta_cutoffs(base, expert, counts, largest)
        for j, count in enumerate(counts):
            assert got[j].tolist() == magnitude_cutoff_reference(expert - base, count, largest).tolist()
    expert[9] = float("nan")
    with pytest.raises(ValueError, match="the expert has 1 NaN value"):
        ext.delta_cutoffs(base, expert, counts, True)
    with pytest.raises(ValueError, match="the base has 4 NaN or Inf"):
        ext.delta_cutoffs(expert, base, counts, True)


# Not "outliers": breadcrumbs drops the largest magnitudes, and where the reference (as mergekit) then
# multiplies the Inf delta by 0 it gets NaN, while the kernels add +0 for a dropped element. (DARE's
# draw keeps this element under this seed; magnitude and none keep it always.)
@pytest.mark.parametrize("sparsify", ["magnitude", "random", ""])
def test_overflowing_delta_of_finite_inputs_is_no_error(ext, sparsify):
    # 60000 - (-60000) overflows float16: an Inf delta from finite inputs merges as the reference does
    base, experts = make_inputs((100,), torch.float16, 2, 5)
    base[3], experts[0][3] = -60000.0, 60000.0
    kw = dict(weights=[1.0, 1.0], densities=[0.5, 0.5], sparsify=sparsify, consensus=True, normalize=True)
    want = merge_task_vectors_reference(base, experts, **kw)
    assert all(torch.isfinite(x).all() for x in [base, *experts])
    assert torch.isinf(experts[0][3] - base[3])  # the delta in float16
    assert torch.equal(_merge_with(ext, base, experts, **kw), want)


def test_op_dispatches_to_the_extension(ext, monkeypatch):
    calls = []

    class Spy:
        def merge_task_vectors(self, *args):
            calls.append(args[3])
            return ext.merge_task_vectors(*args)
    monkeypatch.setattr(backends, "cpu_extension", lambda: Spy())
    from merge_engine import ops
    base, experts = make_inputs((50,), torch.bfloat16, 2, 1)
    ops.merge_task_vectors(base, experts, [1.0, 1.0], [0.5, 0.5], "magnitude", True, True)
    ops.merge_task_vectors(base.double(), [e.double() for e in experts], [1.0, 1.0], [0.5, 0.5])  # reference
    assert calls == [1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_into_a_callers_buffer(ext, dtype):
    base, experts = make_inputs((37, 53), dtype, 3, 4)
    kw = dict(weights=[0.5, 0.3, 0.2], densities=[0.4, 0.5, 0.6], sparsify="magnitude", consensus=True,
              normalize=True)
    want = _merge_with(ext, base, experts, **kw)
    buffer = torch.full((37 * 53 + 8,), float("nan"), dtype=dtype)
    out = buffer[8:].view(37, 53)  # a view into a larger buffer, as the engine's pool hands out
    got = _merge_with(ext, base, experts, **kw, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want) and buffer[:8].isnan().all()
    out.fill_(float("nan"))
    assert ops.merge_task_vectors(base, experts, **kw, out=out) is out and torch.equal(out, want)  # the .out overload
    args = (base, experts, kw["weights"], 1, [0, 0, 0], [400, 500, 600], kw["densities"], [], True, True, False,
            1.0, 0, 0)
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU tensor"):
        ext.merge_task_vectors(*args, out.t())
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU tensor"):
        ext.merge_task_vectors(*args, out.float() if dtype != torch.float32 else out.double())
    with pytest.raises(RuntimeError, match="out must not overlap an input"):
        ext.merge_task_vectors(*args, experts[1])


def test_selection_counts_follow_the_references():
    assert selection_counts(10, "magnitude", 0.25, 0) == (0, 2)
    assert selection_counts(10, "magnitude", 0.01, 0) == (0, 1)
    assert selection_counts(10, "magnitude", 0.0, 0) == (0, 0)
    assert selection_counts(10, "outliers", 0.5, 0.2) == (3, 8)
    assert selection_counts(10, "outliers", 1.0, 0.2) == (0, 10)


def test_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path):
    broken = tmp_path / "csrc"
    (broken / "cpu").mkdir(parents=True)
    for name in ("bindings.cpp", "task_vectors.cpp"):
        (broken / "cpu" / name).write_text("#error deliberately broken\n")
    monkeypatch.setattr(backends, "csrc_dir", lambda: str(broken))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    backends.cpu_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled CPU kernels unavailable") as record:
            assert backends.cpu_extension() is None
            assert backends.cpu_extension() is None
        assert len(record) == 1
        from merge_engine import ops
        base, experts = make_inputs((20,), torch.float32, 2, 0)
        kw = dict(weights=[1.0, 1.0], densities=[0.5, 0.5], sparsify="magnitude", consensus=True, normalize=True)
        assert torch.equal(ops.merge_task_vectors(base, experts, **kw), merge_task_vectors_reference(base, experts, **kw))
    finally:
        backends.cpu_extension.cache_clear()


HUGE_PAGE_PROBE = """
import torch
from merge_engine.ops import backends
from merge_engine.ops.consensus import _merge_with
backends.cpu_extension().set_huge_page_outputs(ADVISE)
base = torch.zeros(5 * 2**20, dtype=torch.bfloat16)  # 10 MiB: whole 2 MiB pages inside
out = _merge_with(backends.cpu_extension(), base, [base + 1, base - 1], [1.0, 1.0], [0.5, 0.5], "magnitude", True)
first = (out.data_ptr() + 2**21 - 1) // 2**21 * 2**21
span = None
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:
        lo, hi = (int(x, 16) for x in head.split("-"))
        span = lo <= first < hi
    elif span and head == "VmFlags:":
        print("hg" in line.split()[1:])
"""


THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@pytest.mark.skipif(not os.path.exists(THP_SETTING) or "[never]" in open(THP_SETTING).read(),
                    reason="no transparent huge pages on this system")
@pytest.mark.parametrize("advise", [True, False])
def test_outputs_are_advised_onto_huge_pages(ext, advise):
    # with torch's own huge-page allocation off (a library user's process), the kernel still asks
    # for huge pages for its fresh output before touching it (the advice shows as VmFlags "hg"),
    # unless told not to (where the host reclaims free huge pages: merge_engine/runtime.py)
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="0")
    run = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE.replace("ADVISE", str(advise))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(advise)]


@pytest.mark.skipif(not os.path.exists(THP_SETTING) or "[never]" in open(THP_SETTING).read(),
                    reason="no transparent huge pages on this system")
def test_the_extension_advises_huge_pages_unless_the_host_reclaims_them(ext):
    from merge_engine import runtime
    probe = HUGE_PAGE_PROBE.replace("backends.cpu_extension().set_huge_page_outputs(ADVISE)\n", "")
    run = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, THP_MEM_ALLOC_ENABLE="0"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(not runtime.host_reclaims_free_huge_pages())]


@pytest.mark.parametrize("start", [0, 3, 4 * (2**32 - 40) + 1, 4 * (2**32 - 3), 4 * (2**32 + 5) + 2, 2**40 + 7])
def test_philox_uniforms_match_reference_across_the_counter_wrap(ext, start):
    # the lanes draw 16 groups of 4 at a time and leave a batch whose low counter word would wrap to
    # the scalar generator: around element 2^34 both paths and the carry into the high word must agree
    from merge_engine.ops.random import philox_key, uniform
    key = philox_key(7, "model.layers.0.mlp.up_proj.weight")
    for stream in (0, 5):
        got = ext.philox_uniforms(start, 1001, stream, *key)
        assert torch.equal(got, uniform(1001, key, stream, start=start)), f"start {start}, stream {stream}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("densities", [[0.96, 0.97], [0.96, 0.5], [0.5, 0.3]])
def test_breadcrumbs_with_and_without_a_lower_cut(ext, dtype, densities):
    # density + gamma >= 1 leaves no lower cut (its count is 0: the cut-off that selects nothing), for
    # both experts or beside a windowed one; two experts: the sums are order-free, so exact
    base, experts = make_inputs((37, 53), dtype, 2, 11)
    kw = dict(weights=[0.7, 0.5], densities=densities, sparsify="outliers", consensus=True, normalize=True,
              gammas=[0.05, 0.05])
    got = _merge_with(ext, base, experts, **kw)
    assert torch.equal(got, merge_task_vectors_reference(base, experts, **kw))
