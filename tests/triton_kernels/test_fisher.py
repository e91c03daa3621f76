"""The Triton Fisher kernels (triton_kernels/fisher.py) against the PyTorch references: through the
Triton interpreter on CPU tensors (TRITON_INTERPRET=1, as tools/test.sh sets), or on a GPU.

Both ops are elementwise chains of correctly rounded fp32 steps, so every output must have the
reference's exact bits (stricter than torch.equal: signed zeros count; a NaN matches any NaN, whose
sign and payload are the hardware's). Inputs span many magnitudes, down to fp32 subnormals (a kernel
that flushed them to zero would show), with exact zeros, coefficients and floors that are not fp32
values (their rounding to fp32 is part of the spec) and some that are 0.

The GPU lowering is checked without a GPU too: both kernels are compiled for sm_80 and sm_90, for every
dtype pair, and their PTX must round every fp32 add, multiply and divide explicitly to nearest (.rn:
ptxas fuses no such pair into an fma, and the division is IEEE) and never flush subnormals (.ftz).

Inputs are seeded from the test parameters (zlib.crc32 of their repr, stable across runs); every
assertion message names the seed.
"""
import os
import re
import zlib

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from merge_engine.ops import backends  # noqa: E402
from merge_engine.ops.fisher import (  # noqa: E402
    _accumulate_with,
    _merge_with,
    accumulate_fisher_reference,
    fisher_merge_reference,
    invalid_fisher_message,
)
from merge_engine.triton_kernels import fisher as tf  # noqa: E402
from tests.triton_kernels.gpu_lowering import ptx_float_ops  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    # inputs overflow to Inf and make NaN on purpose; numpy, under the interpreter, warns of each
    pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning"),
]

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [(1,), (7,), (1023,), (4097,), (37, 53)]
# log10 range of drawn Fisher values: fp32 and bf16 reach fp32 subnormals (below 1.2e-38)
FISHER_LOG10 = {torch.float32: (-44.0, 4.0), torch.bfloat16: (-44.0, 4.0), torch.float16: (-8.0, 4.0)}


def seed_of(*params) -> int:
    return zlib.crc32(repr(params).encode()) % 10**6


def make_models(shape, dtype, fisher_dtype, k, seed, zero_fraction=0.1):
    """k params (randn) and Fishers of many magnitudes (a zero_fraction of them exactly 0), and k
    coefficients in [0, 2) and floors in [1e-9, 1e-2), each 0 with probability 0.25 (fp64 values)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(k)]
    lo, hi = FISHER_LOG10[fisher_dtype]
    fishers = []
    for _ in range(k):
        f = 10.0 ** (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64))
        f[torch.rand(shape, generator=g) < zero_fraction] = 0
        fishers.append(f.to(DEVICE, fisher_dtype))
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


def check_merge(params, fishers, coefficients, floors, context):
    got = _merge_with(tf, params, fishers, coefficients, floors)
    assert got.device == params[0].device
    assert_identical(got, fisher_merge_reference(params, fishers, coefficients, floors), context)
    return got


# ---- fisher_merge ----

@pytest.mark.parametrize("fisher_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_merge_matches_reference_exactly(dtype, fisher_dtype, k):
    for shape in SIZES:
        seed = seed_of(shape, dtype, fisher_dtype, k)
        params, fishers, coefficients, floors = make_models(shape, dtype, fisher_dtype, k, seed)
        check_merge(params, fishers, coefficients, floors,
                    f"seed {seed}, shape {shape}, coefficients {coefficients}, floors {floors}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_fishers_give_the_first_model(dtype):
    seed = seed_of("zero", dtype)
    params, fishers, _, _ = make_models((37, 53), dtype, torch.bfloat16, 3, seed, zero_fraction=0.6)
    # all zero: theta_0 everywhere; 60% zeros, no floors: theta_0 wherever every Fisher is 0
    zeros = [torch.zeros_like(f) for f in fishers]
    assert torch.equal(check_merge(params, zeros, [1.0, 0.5, 2.0], [0.0] * 3, f"seed {seed}, all zero"), params[0])
    got = check_merge(params, fishers, [1.0, 0.5, 2.0], [0.0] * 3, f"seed {seed}, 60% zeros")
    nowhere = torch.stack([f == 0 for f in fishers]).all(0)
    assert nowhere.any() and torch.equal(got[nowhere], params[0][nowhere]), f"seed {seed}"
    # zero coefficients weigh nothing either
    assert torch.equal(check_merge(params, fishers, [0.0] * 3, [1e-3] * 3, f"seed {seed}, c = 0"), params[0])


def test_extreme_magnitudes():
    """d overflowing to Inf (num / den: Inf / Inf is NaN, x / Inf is 0), subnormal d and terms."""
    seed = seed_of("extreme")
    params, fishers, _, _ = make_models((4097,), torch.float32, torch.float32, 3, seed)
    fishers[1][::3] = 3.4e38
    fishers[2][1::5] = 1e-45
    params[2][::7] = float("inf")
    check_merge(params, fishers, [1.0, 4.0, 1e-3], [0.0, 1e-38, 0.0], f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros(dtype):
    """Model 0 starts the sums: -0 + -0 is -0, where 0 + -0 + -0 would give +0."""
    seed = seed_of("signed zeros", dtype)
    params, fishers, _, _ = make_models((1023,), dtype, torch.float32, 2, seed)
    for p in params:
        p[::3] = -0.0
    for k in (1, 2):
        got = check_merge(params[:k], fishers[:k], [1.0, 0.5][:k], [0.0, 0.0][:k], f"seed {seed}, k {k}")
        assert (bits(got[::3]) == bits(params[0][::3])).any(), f"seed {seed}: no -0 output"


def smallest_negative(dtype):
    """-(the smallest subnormal) of a dtype: sign bit and last mantissa bit."""
    width = torch.int16 if dtype.itemsize == 2 else torch.int32
    return torch.tensor(-(2 ** (8 * dtype.itemsize - 1)) + 1, dtype=width).view(dtype)


@pytest.mark.parametrize("fisher_dtype", DTYPES)
@pytest.mark.parametrize("bad", [-1.0, "smallest negative", float("nan"), float("inf"), float("-inf")])
def test_bad_fisher_values_name_the_first_bad_model(fisher_dtype, bad):
    seed = seed_of("bad", fisher_dtype, bad)
    params, fishers, coefficients, floors = make_models((4097,), torch.bfloat16, fisher_dtype, 4, seed)
    fishers[0][5] = -0.0  # valid: -0 >= 0
    fishers[2][[3, 1500, 4096]] = smallest_negative(fisher_dtype).to(DEVICE) if bad == "smallest negative" else bad
    fishers[3][0] = float("nan")
    message = invalid_fisher_message(2, 3)
    with pytest.raises(ValueError) as reference_error:
        fisher_merge_reference(params, fishers, coefficients, floors)
    with pytest.raises(ValueError) as error:
        tf.fisher_merge(params, fishers, coefficients, floors)
    assert str(error.value) == str(reference_error.value) == message, f"seed {seed}"


def test_any_number_of_models():
    seed = seed_of("many")
    params, fishers, coefficients, floors = make_models((1023,), torch.float16, torch.float32, 40, seed)
    check_merge(params, fishers, coefficients, floors, f"seed {seed}")


# ---- accumulate_fisher ----

@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("fisher_dtype", DTYPES)
def test_accumulate_matches_reference_exactly(fisher_dtype, grad_dtype):
    for shape in SIZES:
        seed = seed_of("accumulate", shape, fisher_dtype, grad_dtype)
        g = torch.Generator().manual_seed(seed)
        fisher = torch.rand(shape, generator=g).to(DEVICE, fisher_dtype)
        want = fisher.clone()
        for step in range(3):  # grads of many magnitudes: g^2 from fp32 subnormals to overflow
            grad = torch.randn(shape, generator=g) * 10.0 ** (-24 + 44 * torch.rand(shape, generator=g))
            grad = grad.to(DEVICE, grad_dtype)
            scale = float(torch.rand((), generator=g, dtype=torch.float64)) / (step + 1)
            _accumulate_with(tf, fisher, grad, scale)
            accumulate_fisher_reference(want, grad, scale)
            assert_identical(fisher, want, f"seed {seed}, shape {shape}, step {step}, scale {scale!r}")


# ---- edges and plumbing ----

def test_empty_tensors():
    empty = torch.empty(0, 3, device=DEVICE, dtype=torch.bfloat16)
    assert tf.fisher_merge([empty, empty], [empty, empty], [1.0, 1.0], [0.0, 0.0]).shape == (0, 3)
    tf.accumulate_fisher(empty, empty, 1.0)


def test_unsupported_inputs_are_rejected():
    x = torch.ones(8, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tf.fisher_merge([x.double()], [x], [1.0], [0.0])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tf.accumulate_fisher(x, x.double(), 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        tf.fisher_merge([x, x.t()], [x, x], [1.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="contiguous tensors on"):
        tf.accumulate_fisher(x, x.to("meta"), 1.0)
    with pytest.raises(ValueError, match="one Fisher, coefficient and floor"):
        tf.fisher_merge([x, x], [x], [1.0, 1.0], [0.0, 0.0])


def test_backend_is_the_triton_module(monkeypatch):
    monkeypatch.setenv("MERGE_ENGINE_KERNELS", "1")
    backends.triton_backend.cache_clear()
    try:
        assert backends.triton_backend("fisher") is tf
    finally:
        backends.triton_backend.cache_clear()


# Per (arch, dtypes, kernel): its PTX floating-point and conversion instructions (gpu_lowering.py).
COMPILE_FOR_GPUS = r"""
from merge_engine.triton_kernels import fisher as tf
dtypes = ["fp32", "bf16", "fp16"]
for arch in (80, 90):
    for a in dtypes:
        for b in dtypes:
            merge = dict(param0_ptr=f"*{a}", fisher0_ptr=f"*{b}", params_ptr="*i64", fishers_ptr="*i64",
                         coefficients_ptr="*fp32", floors_ptr="*fp32", bad_ptr="*i64", out_ptr=f"*{a}", n="i64",
                         K="i32", BLOCK="constexpr")
            accumulate = dict(fisher_ptr=f"*{a}", grad_ptr=f"*{b}", n="i64", scale="fp32", BLOCK="constexpr")
            for kernel, signature in ((tf._merge_kernel, merge), (tf._accumulate_kernel, accumulate)):
                found[f"sm_{arch} {a} {b} {kernel.__name__}"] = float_ops(kernel, signature, tf.BLOCK, tf._IEEE, arch)
"""


def test_kernels_lower_to_ieee_ptx_for_sm80_and_sm90():
    found = ptx_float_ops(COMPILE_FOR_GPUS)
    assert len(found) == 36
    for kernel, ops in found.items():
        arithmetic = [op for op in ops if re.match(r"(fma|add|sub|mul|div|max|min)\.", op)]
        assert arithmetic and all(re.fullmatch(r"(add|sub|mul|div)\.rn\.f32", op) for op in arithmetic), (kernel, ops)
        assert not [op for op in ops if ".ftz" in op], (kernel, ops)
        narrowing = [op for op in ops if re.match(r"cvt\.\w*\.?b?f16\.f32", op)]
        assert all(".rn." in op for op in narrowing), (kernel, ops)
    assert all("div.rn.f32" in ops for kernel, ops in found.items() if "merge" in kernel)
