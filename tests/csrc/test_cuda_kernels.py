"""The CUDA kernels (csrc/cuda) against the PyTorch references and the C++ CPU kernels (needs a GPU).

Cut-offs, DARE masks and all-zero deltas: with the other backends' in tests/kernels/test_task_vectors.py.
Merged values:
- against the C++ CPU kernels (the same arithmetic: the same roundings to the dtype, fp32 sums over
  the experts in expert order): bit-identical (torch.equal) for every K, mode, dtype and shape,
  except with rescale (below);
- against the reference, run on the GPU: bit-identical for K <= 2 without rescale. For K > 2 torch's
  CUDA reductions pick their association order by shape (ATen/native/cuda/Reduce.cuh: vt0 = 4
  accumulators per thread, and lanes of a warp for reductions over the fastest dimension, e.g. the
  weight sum of normalize, or the expert sum of a one-element tensor), so an fp32 sum may differ in
  its last bit from the expert-order sum, a rounding to the dtype may flip, and an elected sign may
  flip where the sum is ~0 (such elements are not compared). Only two-term sums are order-free.
- With rescale the L1 factor is a ratio of two whole-tensor sums taken in a different order (here:
  fp64 per-block partials in a fixed tree; the reference: a torch sum in the dtype), so the factor
  may differ by a few ulps of the dtype (each sum rounds to the dtype, then their ratio does; in fp32
  the reference's own sum carries up to ~log2(n) ulps of re-association error). Each weighted term
  w_i * kept_i * f_i moves by that relative error.
The bound (assert_close_merge), with p the dtype's mantissa bits:
    |got - want| <= 4 ulp(|want|) + (2^-(p-3) + 2K 2^-24 + F) * S / w_min,
    F = 2^-(p-3) + 4 log2(n) 2^-24 with rescale, else 0,
2^-(p-3): up to four flipped roundings of the mixed value (sum, divide, lambda, + base); 2K 2^-24:
re-association of K-term fp32 sums; S = |lambda| * sum_i |w_i * sparsified delta_i| (fp64, reference
sparsifiers) bounds every intermediate; w_min, the smallest weight when normalising (else 1), is the
smallest possible divisor. S replaces a relative |want - base| bound because without consensus the
terms may cancel.

Fisher, Gram and permute ops (fisher.cu, gram.cu, permute.cu): their values are tested with the
other backends' in tests/kernels/ (test_fisher.py, test_gram.py, test_permute.py; on this GPU too);
here, their side streams, argument checks and dispatch.
"""
import math
import zlib

import pytest
import torch

from merge_engine.ops import backends
from merge_engine.ops import fisher as fisher_ops
from merge_engine.ops import gram as gram_ops
from merge_engine.ops import permute as permute_ops
from merge_engine.ops.consensus import _merge_with, merge_task_vectors_reference
from merge_engine.ops.fisher import accumulate_fisher_reference
from merge_engine.ops.permute import swap_blocks_reference
from merge_engine.ops.select import magnitude_cutoff
from merge_engine.ops.sparsify import SPARSIFY_CODES
from tests.conftest import DTYPES, MANTISSA, SIZES, pairwise, ulp
from tests.csrc import kernel_checks
from tests.csrc.kernel_checks import (
    another_thread_ran_during,
    random_bits,
    weighted_contributions,
)
from tests.kernels import test_fisher as kernel_fisher
from tests.kernels import test_gram as kernel_gram
from tests.kernels import test_permute as kernel_permute
from tests.kernels.conftest import load_backend

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA kernels cannot run here (tests/csrc/test_cuda_compile.py "
                "checks that they compile)", allow_module_level=True)
if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

MODES = list(SPARSIFY_CODES)


@pytest.fixture(scope="module")
def ext():
    module = backends.cuda_extension()
    assert module is not None, "the CUDA extension failed to build (see the warning above)"
    return module


@pytest.fixture(scope="module")
def cpu_ext():
    return backends.cpu_extension()  # None: the CPU-parity checks are skipped


def stable_seed(*parts):
    return zlib.crc32(repr(parts).encode()) % 10**6


def make_inputs(*args, **kwargs):
    return kernel_checks.make_inputs(*args, device="cuda", **kwargs)


def merge_kwargs(k, sparsify, consensus, normalize, rescale, seed, lambda_=0.9):
    return dict(weights=[0.3 + 0.4 * i for i in range(k)], densities=[0.2 + 0.08 * i for i in range(k)],
                sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_,
                gammas=[0.05] * k if sparsify == "outliers" else None,
                epsilons=[0.1] * k if sparsify == "rank" else None, seed=seed, tensor_name="t")


def assert_close_merge(got, want, base, experts, kw, context):
    """The bound of the module docstring; elements whose elected sign is numerically undecided
    (|fp64 sum| within the re-association and factor errors) are not compared."""
    got, want = got.cpu(), want.cpu()
    dtype, k, n = base.dtype, len(experts), base.numel()
    p = MANTISSA[dtype]
    lam = abs(kw.get("lambda_", 1.0))
    signed, s = weighted_contributions(base, experts, kw)
    s = s * lam
    reassociation = 2 * k * 2.0 ** -24
    factor = (2.0 ** -(p - 3) + 4 * math.log2(max(n, 2)) * 2.0 ** -24) if kw.get("rescale") else 0.0
    if kw.get("consensus"):
        undecided = signed.abs() * lam <= (reassociation + factor) * s
    else:
        undecided = torch.zeros(signed.shape, dtype=torch.bool)
    w_min = min(kw["weights"]) if kw.get("normalize") else 1.0
    g, w = got.double(), want.double()
    bound = 4 * ulp(w, dtype) + (2.0 ** -(p - 3) + reassociation + factor) * s / w_min
    excess = torch.where(undecided, 0, (g - w).abs() - bound)
    assert (excess <= 0).all(), f"{context}: error exceeds the bound by {float(excess.max())}"


# ---- delta_cutoffs ----

def test_delta_cutoffs_on_a_side_stream(ext):
    base, (expert,) = make_inputs((4097,), torch.bfloat16, 1, 5, ties=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ext.delta_cutoffs(base, expert, [100, 2000], True)
    delta = (expert - base).cpu()
    assert got.tolist() == [magnitude_cutoff(delta, c, True).tolist() for c in (100, 2000)]


# ---- merge_task_vectors ----

def check_merge(ext, cpu_ext, base, experts, kw, context):
    got = _merge_with(ext, base, experts, **kw)
    assert got.device == base.device and got.dtype == base.dtype and got.shape == base.shape
    k = len(experts)
    if cpu_ext is not None:
        on_cpu = _merge_with(cpu_ext, base.cpu(), [e.cpu() for e in experts], **kw)
        if kw.get("rescale"):
            assert_close_merge(got, on_cpu, base, experts, kw, context + " (vs the CPU kernels)")
        else:
            assert torch.equal(got.cpu(), on_cpu), f"{context}: {(got.cpu() != on_cpu).sum()} elements differ from the CPU kernels"
    want = merge_task_vectors_reference(base, experts, **kw)
    if k <= 2 and not kw.get("rescale"):
        assert torch.equal(got, want), f"{context}: {(got != want).sum()} elements differ from the reference"
    else:
        assert_close_merge(got, want, base, experts, kw, context)
    return got


CASES = [  # (consensus, normalize, rescale)
    (False, True, False), (False, False, False), (True, True, False), (True, False, False),
    (True, True, True), (False, False, True),
]


# every mode with every case, size and dtype, and each of those with each other: a pairwise covering set
@pytest.mark.parametrize("dtype, shape, sparsify, case", pairwise(DTYPES, SIZES, MODES, CASES))
def test_merge_matches_reference(ext, cpu_ext, dtype, shape, sparsify, case):
    consensus, normalize, rescale = case
    seed = stable_seed(shape, case, sparsify, dtype)
    k = 1 + seed % 8
    base, experts = make_inputs(shape, dtype, k, seed)
    kw = merge_kwargs(k, sparsify, consensus, normalize, rescale, seed)
    check_merge(ext, cpu_ext, base, experts, kw, f"seed {seed}, k {k}")


@pytest.mark.parametrize("dtype, k, sparsify", pairwise(DTYPES, range(1, 9), ["", "magnitude", "random", "outliers"]))
def test_every_expert_count(ext, cpu_ext, dtype, k, sparsify):
    seed = 1000 * k + MODES.index(sparsify)
    base, experts = make_inputs((4097,), dtype, k, seed, ties=sparsify == "magnitude")
    kw = merge_kwargs(k, sparsify, True, True, False, seed, lambda_=1.0)
    check_merge(ext, cpu_ext, base, experts, kw, f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 1e-4, 0.5, 1.0])
def test_ties_densities_and_a_larger_tensor(ext, cpu_ext, dtype, density):
    k = 3
    base, experts = make_inputs((257, 1031), dtype, k, int(density * 1000), ties=True)
    kw = dict(weights=[1.0, 0.5, 0.25], densities=[density] * k, sparsify="magnitude", consensus=True, normalize=True)
    check_merge(ext, cpu_ext, base, experts, kw, f"density {density}")


def test_rescale_is_deterministic_and_stream_ordered(ext):
    base, experts = make_inputs((37, 53), torch.float32, 5, 11)
    kw = merge_kwargs(5, "random", True, True, True, 11)
    first = _merge_with(ext, base, experts, **kw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = _merge_with(ext, base, experts, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(first, second)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_errors(ext, bad):
    base, experts = make_inputs((100,), torch.float32, 2, 3)
    experts[1][17] = bad
    with pytest.raises(ValueError, match="expert 1 has 1 NaN or Inf"):
        _merge_with(ext, base, experts, [1.0, 1.0], [0.5, 0.5], "magnitude", True, True)
    # the cut-offs order an Inf expert value as the largest magnitude (as the CPU kernel and the reference
    # do): only a NaN expert value, and any non-finite base value, are errors there
    if bad != bad:
        with pytest.raises(ValueError, match="the expert has 1 NaN value"):
            ext.delta_cutoffs(base, experts[1], [10], True)
    else:
        delta = (experts[1] - base).cpu()
        assert ext.delta_cutoffs(base, experts[1], [1], True).tolist() == [magnitude_cutoff(delta, 1, True).tolist()]
    with pytest.raises(ValueError, match="the base has 1 NaN or Inf"):
        ext.delta_cutoffs(experts[1], base, [10], True)


def test_bad_inputs_are_rejected(ext):
    base, experts = make_inputs((64,), torch.float32, 17, 1)
    with pytest.raises(RuntimeError, match="at most 16 experts"):
        ext.merge_task_vectors(base, experts, [1.0] * 17, 0, [], [], [1.0] * 17, [], False, False, False, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ext.delta_cutoffs(base.cpu(), experts[0].cpu(), [1], True)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.delta_cutoffs(base.double(), experts[0].double(), [1], True)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.delta_cutoffs(base.reshape(8, 8).t(), experts[0].reshape(8, 8).t(), [1], True)


def test_op_dispatches_to_the_cuda_extension(ext, monkeypatch):
    calls = []

    class Spy:
        def merge_task_vectors(self, *args):
            calls.append(args[3])
            return ext.merge_task_vectors(*args)
    monkeypatch.setattr(backends, "gpu_backend", lambda: Spy())
    from merge_engine import ops
    base, experts = make_inputs((50,), torch.bfloat16, 2, 1)
    ops.merge_task_vectors(base, experts, [1.0, 1.0], [0.5, 0.5], "magnitude", True, True)
    assert calls == [1]


# ---- Fisher ops (csrc/cuda/fisher.cu): their values with the other backends' in tests/kernels/test_fisher.py ----

def fisher_models(shape, dtype, fisher_dtype, k, seed):
    """tests/kernels/test_fisher.py's models, on the GPU."""
    params, fishers, coefficients, floors = kernel_fisher.make_models(shape, dtype, fisher_dtype, k, seed)
    return [p.cuda() for p in params], [f.cuda() for f in fishers], coefficients, floors


def test_fisher_ops_on_a_side_stream(ext):
    params, fishers, coefficients, floors = fisher_models((4097,), torch.bfloat16, torch.float32, 3, 9)
    want = fishers[0].cpu()
    accumulate_fisher_reference(want, params[1].cpu(), 0.5)
    first = ext.fisher_merge(params, fishers, coefficients, floors)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = ext.fisher_merge(params, fishers, coefficients, floors)
        ext.accumulate_fisher(fishers[0], params[1], 0.5)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(first, second)
    kernel_fisher.assert_identical(fishers[0], want, "accumulated on a side stream")


def test_fisher_bad_inputs_are_rejected(ext):
    x = torch.ones(8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ext.fisher_merge([x.cpu()], [x.cpu()], [1.0], [0.0])
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ext.accumulate_fisher(x, x.cpu(), 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.fisher_merge([x.double()], [x], [1.0], [0.0])
    with pytest.raises(RuntimeError, match="dtype"):
        ext.accumulate_fisher(x, x.double(), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.fisher_merge([x, x.t()], [x, x], [1.0, 1.0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="one Fisher, coefficient and floor"):
        ext.fisher_merge([x, x], [x], [1.0, 1.0], [0.0, 0.0])


def test_fisher_ops_dispatch_to_the_cuda_extension(ext, monkeypatch):
    calls = []

    class Spy:
        def fisher_merge(self, *args):
            calls.append("fisher_merge")
            return ext.fisher_merge(*args)

        def accumulate_fisher(self, *args):
            calls.append("accumulate_fisher")
            return ext.accumulate_fisher(*args)
    monkeypatch.setattr(backends, "gpu_backend", lambda family: Spy() if family == "fisher" else None)
    params, fishers, coefficients, floors = fisher_models((50,), torch.float16, torch.bfloat16, 2, 1)
    fisher_ops.fisher_merge(params, fishers, coefficients, floors)
    fisher_ops.accumulate_fisher(fishers[0], params[0], 1.0)
    assert calls == ["fisher_merge", "accumulate_fisher"]


# ---- permute ops (csrc/cuda/permute.cu): their values with the other backends' in tests/kernels/test_permute.py ----

def test_permute_edges_and_streams(ext):
    none = torch.empty(0, dtype=torch.int64, device="cuda")
    empty = [torch.empty(0, 5, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    assert ext.gather_blocks(empty, 1, none, none, 0, 1).shape == (0, 5)
    ext.scatter_add_blocks(empty, 0, empty[0], none, none, 0, 1)
    ext.swap_blocks(empty, none.view(0, 4), 0, 1)
    g = torch.Generator().manual_seed(stable_seed("permute streams"))
    tensors = [random_bits((300, 64), torch.bfloat16, g) for _ in range(3)]
    pairs = torch.tensor([[0, 1, 2, 7], [1, 0, 1, 9]])
    on_gpu = [t.cuda() for t in tensors]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ext.swap_blocks(on_gpu, pairs.cuda(), 1, 4)
    torch.cuda.current_stream().wait_stream(stream)
    swap_blocks_reference(tensors, pairs, 1, 4)
    kernel_permute.assert_same_bits(on_gpu, tensors, "swapped on a side stream")


def test_permute_bad_inputs_are_rejected(ext):
    x = torch.ones(4, 6, device="cuda")
    tables = (torch.zeros(3, dtype=torch.int64, device="cuda"), torch.arange(3, device="cuda"))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ext.gather_blocks([x.cpu()], 0, *tables, 1, 2)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.gather_blocks([x.double()], 0, *tables, 1, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.swap_blocks([x, torch.ones(6, 4, device="cuda").t()], torch.tensor([[0, 0, 1, 1]], device="cuda"), 1, 2)
    with pytest.raises(RuntimeError, match="int64 tensor of 3 entries"):
        ext.scatter_add_blocks([x], 0, x, tables[0].cpu(), tables[1], 1, 2)


def test_permute_ops_dispatch_to_the_cuda_extension(ext, monkeypatch):
    calls = []

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(ext, name)(*args)
            return call
    monkeypatch.setattr(backends, "gpu_backend", lambda family: Spy() if family == "permute" else None)
    tensors = [torch.randn(4, 6, device="cuda", dtype=torch.float16) for _ in range(2)]
    src_layer, src_block = torch.tensor([1, 0, 1], device="cuda"), torch.tensor([0, 1, 2], device="cuda")
    out = permute_ops.gather_blocks(tensors, 0, src_layer, src_block, 1, 2)
    permute_ops.scatter_add_blocks_(tensors, 0, out, src_layer, src_block, 1, 2)
    permute_ops.swap_blocks_(tensors, torch.tensor([[0, 0, 1, 1]], device="cuda"), 1, 2)
    assert calls == ["gather_blocks", "scatter_add_blocks", "swap_blocks"]


# ---- Gram (csrc/cuda/gram.cu): its values with the other backends' in tests/kernels/test_gram.py ----

def check_gram(accumulate, d, dtype, mask_kind, seed, lead_shape):
    """tests/kernels/test_gram.py's two accumulations, on the GPU."""
    gpu = load_backend("cuda", "gram")
    kernel_gram.check_two_accumulations(gpu, accumulate, lead_shape, d, dtype, mask_kind, seed)


def test_accumulate_gram_on_a_side_stream_through_the_op(ext, monkeypatch):
    calls = []

    class Spy:
        def accumulate_gram(self, *args):
            calls.append(tuple(args[1].shape))
            return ext.accumulate_gram(*args)
    monkeypatch.setattr(backends, "gpu_backend", lambda family: Spy() if family == "gram" else None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        check_gram(gram_ops.accumulate_gram, 130, torch.bfloat16, "random", stable_seed("gram op"), (3, 50))
    assert calls == [(150, 130)] * 2


def test_accumulate_gram_bad_inputs_are_rejected(ext):
    x, gram = torch.ones(4, 7, device="cuda"), torch.zeros(7, 7, device="cuda")
    for args, message in [
        ((gram.cpu(), x, None), "float32 \\[d, d\\] CUDA tensor"),
        ((torch.zeros(7, 7, device="cuda").t(), x, None), "contiguous float32 \\[d, d\\]"),
        ((gram, x.double(), None), "float32, bfloat16 or float16 \\[T, d\\]"),
        ((gram, x.cpu(), None), "activations on cpu"),
        ((gram, torch.ones(4, 6, device="cuda"), None), "does not match activations"),
        ((gram, x, torch.ones(4, device="cuda")), "mask must be a contiguous bool \\[T\\] tensor"),
        ((gram, x, torch.ones(4, dtype=torch.bool)), "mask must be a contiguous bool \\[T\\] tensor"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            ext.accumulate_gram(*args)


def test_kernels_let_other_python_threads_run_while_they_wait_for_the_gpu(ext):
    # as the CPU kernels (tests/csrc/test_cpu_bindings.py): before, they held the GIL throughout, through their waits
    # for the GPU too (delta_cutoffs reads its counts back)
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randn(1 << 26, device="cuda", generator=g).bfloat16() for _ in range(2))
    ext.delta_cutoffs(x, y, [1 << 24], True)
    assert another_thread_ran_during(lambda: ext.delta_cutoffs(x, y, [1 << 24], True))
