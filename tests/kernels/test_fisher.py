"""The Fisher kernels of every backend (C++ CPU csrc/cpu/fisher.cpp, CUDA csrc/cuda/fisher.cu, Triton
triton_kernels/fisher.py) against the PyTorch references (merge_engine/ops/fisher.py), run on CPU copies.

Both ops are elementwise chains of correctly rounded fp32 steps in the references' order (the C++
kernels build with -ffp-contract=off; the GPU ones round each step explicitly, see the PTX checks in
tests/triton_kernels/test_fisher.py), so every output must have the reference's exact bits (stricter
than torch.equal: signed zeros count; a NaN matches any NaN, whose sign and payload are the
hardware's). Inputs span many magnitudes, down to fp32 subnormals (a kernel that flushed them to zero
would show), with exact zeros, coefficients and floors that are not fp32 values (their rounding to
fp32 is part of the spec) and some that are 0.

Covering: every (params dtype, Fisher dtype) pair, K = 1 (the first model alone), 2, 3, 5 and 8 over
a pairwise covering set, each on every size of SIZES (one element, under a 16-lane vector, past
the CPU's 4096-element work item), and for CUDA one more than its grid holds (grid-stride loop).
"""
import pytest
import torch

from merge_engine.ops.fisher import (
    _accumulate_with,
    _merge_with,
    accumulate_fisher_reference,
    fisher_merge_reference,
    invalid_fisher_message,
)
from tests.conftest import DTYPES, SIZES, pairwise, seed_of
from tests.kernels.conftest import on, per_backend

FAMILY = "fisher"
pytestmark = [
    # inputs overflow to Inf and make NaN on purpose; numpy, under the Triton interpreter, warns of each
    pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning"),
]

# log10 range of drawn Fisher values: fp32 and bf16 reach fp32 subnormals (below 1.2e-38)
FISHER_LOG10 = {torch.float32: (-44.0, 4.0), torch.bfloat16: (-44.0, 4.0), torch.float16: (-8.0, 4.0)}
# per backend, the sizes every merge and accumulation runs on: CUDA adds more tiles than threads
BACKEND_SIZES = {"cpu": SIZES, "cuda": SIZES + [(2_000_003,)], "triton": SIZES}
MERGE_CASES = pairwise(DTYPES, DTYPES, [1, 2, 3, 5, 8])  # (dtype, fisher_dtype, k)
DTYPE_PAIRS = pairwise(DTYPES, DTYPES)


def make_models(shape, dtype, fisher_dtype, k, seed, zero_fraction=0.1):
    """k params (randn) and Fishers of many magnitudes (a zero_fraction of them exactly 0), and k
    coefficients in [0, 2) and floors in [1e-9, 1e-2), each 0 with probability 0.25 (fp64 values)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]
    lo, hi = FISHER_LOG10[fisher_dtype]
    fishers = []
    for _ in range(k):
        f = 10.0 ** (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64))
        f[torch.rand(shape, generator=g) < zero_fraction] = 0
        fishers.append(f.to(fisher_dtype))
    kept = torch.rand(2, k, generator=g) >= 0.25
    coefficients = torch.where(kept[0], 2 * torch.rand(k, generator=g, dtype=torch.float64), 0.0)
    floors = torch.where(kept[1], 10.0 ** (-9 + 7 * torch.rand(k, generator=g, dtype=torch.float64)), 0.0)
    return params, fishers, coefficients.tolist(), floors.tolist()


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.cpu().view(torch.int16 if x.element_size() == 2 else torch.int32)


def assert_identical(got, want, context):
    assert got.dtype == want.dtype and got.shape == want.shape, f"{context}: {got.dtype} {got.shape}"
    nan = want.cpu().isnan()
    differ = (bits(got) != bits(want)) & ~(nan & got.cpu().isnan())
    assert not differ.any(), f"{context}: {int(differ.sum())} of {want.numel()} elements differ"


def check_merge(backend, params, fishers, coefficients, floors, context):
    """The backend's merge of the inputs (on its device) has the CPU reference's bits; returns it on the CPU."""
    got = _merge_with(backend.module, backend.put(params), backend.put(fishers), coefficients, floors)
    assert got.device.type == backend.device
    assert_identical(got, fisher_merge_reference(params, fishers, coefficients, floors), context)
    return got.cpu()


# ---- fisher_merge ----

@per_backend("dtype, fisher_dtype, k", {name: MERGE_CASES for name in BACKEND_SIZES})
def test_merge_matches_reference_exactly(backend, dtype, fisher_dtype, k):
    for shape in BACKEND_SIZES[backend.name]:
        seed = seed_of("fisher", shape, dtype, fisher_dtype, k)
        params, fishers, coefficients, floors = make_models(shape, dtype, fisher_dtype, k, seed)
        check_merge(backend, params, fishers, coefficients, floors,
                    f"seed {seed}, shape {shape}, coefficients {coefficients}, floors {floors}")


@per_backend("dtype", {name: [(dtype,) for dtype in DTYPES] for name in BACKEND_SIZES})
def test_zero_fishers_give_the_first_model(backend, dtype):
    seed = seed_of("zero", dtype)
    params, fishers, _, _ = make_models((37, 53), dtype, torch.bfloat16, 3, seed, zero_fraction=0.6)
    # all zero: theta_0 everywhere; 60% zeros, no floors: theta_0 wherever every Fisher is 0
    zeros = [torch.zeros_like(f) for f in fishers]
    assert torch.equal(check_merge(backend, params, zeros, [1.0, 0.5, 2.0], [0.0] * 3, f"seed {seed}, all zero"),
                       params[0])
    got = check_merge(backend, params, fishers, [1.0, 0.5, 2.0], [0.0] * 3, f"seed {seed}, 60% zeros")
    nowhere = torch.stack([f == 0 for f in fishers]).all(0)
    assert nowhere.any() and torch.equal(got[nowhere], params[0][nowhere]), f"seed {seed}"
    # zero coefficients weigh nothing either
    assert torch.equal(check_merge(backend, params, fishers, [0.0] * 3, [1e-3] * 3, f"seed {seed}, c = 0"), params[0])


@on()
def test_extreme_magnitudes(backend):
    """d overflowing to Inf (num / den: Inf / Inf is NaN, x / Inf is 0), subnormal d and terms."""
    seed = seed_of("extreme")
    params, fishers, _, _ = make_models((4097,), torch.float32, torch.float32, 3, seed)
    fishers[1][::3] = 3.4e38
    fishers[2][1::5] = 1e-45
    params[2][::7] = float("inf")
    check_merge(backend, params, fishers, [1.0, 4.0, 1e-3], [0.0, 1e-38, 0.0], f"seed {seed}")


@per_backend("dtype", {name: [(dtype,) for dtype in DTYPES] for name in BACKEND_SIZES})
def test_signed_zeros(backend, dtype):
    """Model 0 starts the sums: -0 + -0 is -0, where 0 + -0 + -0 would give +0."""
    seed = seed_of("signed zeros", dtype)
    params, fishers, _, _ = make_models((1023,), dtype, torch.float32, 2, seed)
    for p in params:
        p[::3] = -0.0
    for k in (1, 2):
        got = check_merge(backend, params[:k], fishers[:k], [1.0, 0.5][:k], [0.0, 0.0][:k], f"seed {seed}, k {k}")
        assert (bits(got[::3]) == bits(params[0][::3])).any(), f"seed {seed}: no -0 output"


@per_backend("dtype", {name: [(dtype,) for dtype in DTYPES] for name in BACKEND_SIZES})
def test_negative_zero_fishers_at_a_zero_floor(backend, dtype):
    """A -0 Fisher at floor 0 weighs -0 (max(F, floor) keeps F on a tie) on every backend and at every position,
    the reference's vector loop included: with a -0 param beside it, the merged value is -0."""
    seed = seed_of("negative zero fishers", dtype)
    params, fishers, _, _ = make_models((1023,), dtype, torch.float32, 2, seed)
    params[0][::2], params[1][::2] = 1.0, -0.0
    fishers[0][::2], fishers[1][::2] = -0.0, 1.0
    got = check_merge(backend, params, fishers, [1.0, 0.5], [0.0, 0.0], f"seed {seed}")
    assert (bits(got[::2]) == bits(params[1][::2])).all(), f"seed {seed}"  # (-0 * 1 + 0.5 * -0) / (-0 + 0.5)


def smallest_negative(dtype):
    """-(the smallest subnormal) of a dtype: sign bit and last mantissa bit."""
    width = torch.int16 if dtype.itemsize == 2 else torch.int32
    return torch.tensor(-(2 ** (8 * dtype.itemsize - 1)) + 1, dtype=width).view(dtype)


BAD = [-1.0, "smallest negative", float("nan"), float("inf"), float("-inf")]


@per_backend("fisher_dtype, bad", {name: pairwise(DTYPES, BAD) for name in BACKEND_SIZES})
def test_bad_fisher_values_name_the_first_bad_model(backend, fisher_dtype, bad):
    seed = seed_of("bad", fisher_dtype, bad)
    params, fishers, coefficients, floors = make_models((4097,), torch.bfloat16, fisher_dtype, 4, seed)
    fishers[0][5] = -0.0  # valid: -0 >= 0
    fishers[2][[3, 1500, 4096]] = smallest_negative(fisher_dtype) if bad == "smallest negative" else bad
    fishers[3][0] = float("nan")
    with pytest.raises(ValueError) as reference_error:
        fisher_merge_reference(params, fishers, coefficients, floors)
    with pytest.raises(ValueError) as error:
        backend.module.fisher_merge(backend.put(params), backend.put(fishers), coefficients, floors)
    assert str(error.value).splitlines()[0] == str(reference_error.value) == invalid_fisher_message(2, 3), \
        f"seed {seed}"


@on()
def test_any_number_of_models(backend):
    seed = seed_of("many")
    params, fishers, coefficients, floors = make_models((1023,), torch.float16, torch.float32, 40, seed)
    check_merge(backend, params, fishers, coefficients, floors, f"seed {seed}")


# ---- accumulate_fisher ----

@per_backend("fisher_dtype, grad_dtype", {name: DTYPE_PAIRS for name in BACKEND_SIZES})
def test_accumulate_matches_reference_exactly(backend, fisher_dtype, grad_dtype):
    for shape in BACKEND_SIZES[backend.name]:
        seed = seed_of("accumulate", shape, fisher_dtype, grad_dtype)
        g = torch.Generator().manual_seed(seed)
        want = torch.rand(shape, generator=g).to(fisher_dtype)
        fisher = backend.put(want)
        for step in range(3):  # grads of many magnitudes: g^2 from fp32 subnormals to overflow
            grad = torch.randn(shape, generator=g) * 10.0 ** (-24 + 44 * torch.rand(shape, generator=g))
            grad = grad.to(grad_dtype)
            scale = float(torch.rand((), generator=g, dtype=torch.float64)) / (step + 1)
            _accumulate_with(backend.module, fisher, backend.put(grad), scale)
            accumulate_fisher_reference(want, grad, scale)
            assert_identical(fisher, want, f"seed {seed}, shape {shape}, step {step}, scale {scale!r}")


# NaN bit patterns: a GPU's (0x7FFFFFFF), negative, torch's, and a signalling one. Rounded to bf16 by adding
# 0x7FFF, the first two carried into the sign bit and became -0 and +0: a NaN gradient vanished.
NAN_PATTERNS = [0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001]


@per_backend("fisher_dtype", {name: [(d,) for d in DTYPES] for name in BACKEND_SIZES})
def test_nan_gradients_of_every_bit_pattern_stay_nan(backend, fisher_dtype):
    grad = torch.tensor(NAN_PATTERNS + [0, 1 << 23], dtype=torch.int32).view(torch.float32)
    want = torch.ones(grad.shape, dtype=fisher_dtype)
    fisher = backend.put(want)
    _accumulate_with(backend.module, fisher, backend.put(grad), 0.5)
    accumulate_fisher_reference(want, grad, 0.5)
    assert want[:4].isnan().all()
    assert_identical(fisher, want, f"NaN gradients {NAN_PATTERNS}")


@per_backend("dtype", {name: [(d,) for d in DTYPES] for name in BACKEND_SIZES})
def test_nan_parameters_merge_to_nan(backend, dtype):
    params, fishers, _, _ = make_models((7,), dtype, torch.float32, 2, seed_of("nan params", dtype))
    params[1][:4] = float("nan")
    got = check_merge(backend, params, fishers, [1.0, 1.0], [1e-3, 1e-3], "NaN parameters")
    assert got[:4].isnan().all()
    # where no model weighs anything, the first model's NaN (either sign) is returned as a NaN, of unspecified bits
    params[0][:2], params[0][2:4] = float("nan"), -float("nan")
    zeros = [torch.zeros_like(f) for f in fishers]
    got = check_merge(backend, params, zeros, [1.0, 1.0], [0.0, 0.0], "NaN first model, no weight")
    assert got[:4].isnan().all() and torch.equal(got[4:], params[0][4:])


@on()
def test_empty_tensors(backend):
    empty = torch.empty(0, 3, device=backend.device, dtype=torch.bfloat16)
    assert backend.module.fisher_merge([empty, empty], [empty, empty], [1.0, 1.0], [0.0, 0.0]).shape == (0, 3)
    backend.module.accumulate_fisher(empty, empty, 1.0)
