"""The Fisher op references (merge_engine/ops/fisher.py): the properties of Fisher-weighted averaging
and of the accumulation, against fp64 computations of the same formulas.

Error bound of fisher_merge against the fp64 formula (fp32 accumulation, unit roundoff u = 2^-24):
each term d_j = max(F_j, floor_j) c_j and d_j theta_j is rounded once, and the K-term sums of num and
den add at most K - 1 roundings each, so num is within (K + 1) u sum_j |d_j theta_j| and den within
K u sum_j d_j of their exact values; the quotient then differs from the exact mean by at most
(2K + 2) u M with M = sum_j d_j |theta_j| / sum_j d_j, plus its own rounding (u M) and the rounding
to the output dtype (half an ulp there). Tests use (2K + 3) u M + 1 ulp of the output dtype.
"""
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from merge_engine import ops
from merge_engine.ops import backends
from merge_engine.ops.fisher import _merge_with, accumulate_fisher_reference, fisher_merge_reference
from tests.conftest import DTYPES, MANTISSA, ulp

U = 2.0 ** -24


def make_models(k, shape, dtype, fisher_dtype, seed, zero_fraction=0.0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]
    fishers = []
    for _ in range(k):
        f = torch.rand(shape, generator=g) ** 4 * 10.0 ** torch.randint(-6, 2, (), generator=g).item()
        f[torch.rand(shape, generator=g) < zero_fraction] = 0
        fishers.append(f.to(fisher_dtype))
    return params, fishers


def exact_merge(params, fishers, coefficients, floors):
    """The formula in fp64 on the same (already rounded) inputs, and M = sum d |theta| / sum d."""
    d = [torch.clamp_min(f.double(), fl) * c for f, c, fl in zip(fishers, coefficients, floors)]
    den = sum(d)
    num = sum(dj * p.double() for dj, p in zip(d, params))
    scale = sum(dj * p.double().abs() for dj, p in zip(d, params)) / den
    return num / den, scale


def assert_within_bound(got, exact, scale, k):
    bound = (2 * k + 3) * U * scale + ulp(exact, got.dtype)
    excess = (got.double() - exact).abs() - bound
    assert (excess <= 0).all(), f"error exceeds the bound by {float(excess.max())}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_merge_matches_fp64_formula(dtype, k):
    seed = 100 + k
    params, fishers = make_models(k, (37, 53), dtype, torch.float32, seed)
    coefficients = [0.5 + j for j in range(k)]
    floors = [1e-6] + [0.0] * (k - 1)
    got = fisher_merge_reference(params, fishers, coefficients, floors)
    exact, scale = exact_merge(params, fishers, coefficients, floors)
    assert got.dtype == dtype
    assert_within_bound(got, exact, scale, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_fishers_give_the_weighted_average(dtype):
    params, _ = make_models(3, (1023,), dtype, torch.float32, seed=7)
    f = torch.rand(1023, generator=torch.Generator().manual_seed(8)) + 0.1
    weights = [0.2, 0.3, 0.5]
    got = fisher_merge_reference(params, [f, f, f], weights, [0.0, 0.0, 0.0])
    average = sum(w * p.double() for w, p in zip(weights, params)) / sum(weights)
    scale = sum(w * p.double().abs() for w, p in zip(weights, params)) / sum(weights)
    assert_within_bound(got, average, scale, 3)


def test_a_donor_with_zero_fisher_is_ignored_exactly():
    params, fishers = make_models(3, (4097,), torch.float32, torch.float32, seed=11)
    fishers[2] = torch.zeros_like(fishers[2])
    floors = [1e-6, 0.0, 0.0]
    with_donor = fisher_merge_reference(params, fishers, [1.0, 2.0, 3.0], floors)
    without = fisher_merge_reference(params[:2], fishers[:2], [1.0, 2.0], floors[:2])
    assert torch.equal(with_donor, without)


def test_one_model_returns_its_own_values():
    params, fishers = make_models(1, (4097,), torch.float32, torch.float32, seed=12)
    got = fisher_merge_reference(params, fishers, [0.7], [1e-6])
    assert_within_bound(got, params[0].double(), params[0].double().abs(), 1)


def test_no_fisher_information_and_no_floor_gives_the_first_model():
    params, fishers = make_models(3, (1023,), torch.bfloat16, torch.float32, seed=13, zero_fraction=0.5)
    for f in fishers:
        f[:100] = 0  # no model has information on the first 100 elements
    got = fisher_merge_reference(params, fishers, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert torch.equal(got[:100], params[0][:100])
    assert torch.isfinite(got).all()


def test_the_floor_favours_the_target_model():
    params, fishers = make_models(2, (1023,), torch.float32, torch.float32, seed=14)
    zero = [torch.zeros_like(f) for f in fishers]
    got = fisher_merge_reference(params, zero, [1.0, 1.0], [1e-6, 0.0])
    assert_within_bound(got, params[0].double(), params[0].double().abs(), 1)  # only model 0 has weight
    both = fisher_merge_reference(params, zero, [1.0, 1.0], [1e-6, 1e-6])
    exact = (params[0].double() + params[1].double()) / 2
    assert_within_bound(both, exact, (params[0].double().abs() + params[1].double().abs()) / 2, 2)


def test_a_negative_zero_fisher_at_its_floor_weighs_as_itself_wherever_it_lies():
    """max(F, floor) keeps F on a tie, as the compiled kernels do: a -0 Fisher (valid: a Fisher is >= 0) at
    floor 0 weighs -0 (torch's clamp_min gave +0 inside its vector loop and -0 in its scalar tail), so an
    element's bits do not depend on the tensor's length."""
    for n in (1, 7, 16, 33):
        params = [torch.ones(n), torch.full((n,), -0.0)]
        fishers = [torch.full((n,), -0.0), torch.ones(n)]
        got = fisher_merge_reference(params, fishers, [1.0, 1.0], [0.0, 0.0])
        assert torch.equal(got.view(torch.int32), torch.full((n,), -0.0).view(torch.int32)), n  # (-0 * 1 + -0) / 1


@pytest.mark.parametrize("transposed", ["params", "fishers"])
def test_result_has_the_declared_layout_whatever_the_fishers_layout(transposed):
    """The op's fake (what a torch.compile'd caller allocates by) gives params[0]'s layout; the reference's
    arithmetic over params and Fishers of different layouts gave the Fishers' (opcheck compares the strides)."""
    params, fishers = make_models(2, (7, 5), torch.float32, torch.float32, 3)
    if transposed == "params":
        params = [p.t().contiguous().t() for p in params]
    else:
        fishers = [f.t().contiguous().t() for f in fishers]
    got = ops.fisher_merge(params, fishers, [1.0, 0.5], [1e-6, 0.0])
    assert got.stride() == params[0].stride()
    torch.library.opcheck(torch.ops.merge_engine.fisher_merge.default, (params, fishers, [1.0, 0.5], [1e-6, 0.0]))


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_invalid_fisher_values_are_rejected(bad):
    params, fishers = make_models(3, (7,), torch.float32, torch.float32, seed=15)
    fishers[1][3] = bad
    with pytest.raises(ValueError, match="Fisher of model 1 has 1 negative, NaN or Inf"):
        fisher_merge_reference(params, fishers, [1.0] * 3, [1e-6, 0, 0])


@pytest.mark.parametrize("change", ["shape", "count", "coefficient", "floor"])
def test_bad_arguments_are_rejected(change):
    params, fishers = make_models(2, (7,), torch.float32, torch.float32, seed=16)
    coefficients, floors = [1.0, 1.0], [1e-6, 0.0]
    if change == "shape":
        fishers[1] = torch.ones(8)
    elif change == "count":
        fishers = fishers[:1]
    elif change == "coefficient":
        coefficients[1] = -1.0
    else:
        floors[0] = float("nan")
    with pytest.raises(ValueError):
        fisher_merge_reference(params, fishers, coefficients, floors)


@pytest.mark.parametrize("moved", ["param", "fisher"])
def test_tensors_on_another_device_are_rejected_before_any_kernel(moved):
    """One ValueError naming the model and both devices, from the reference and from the kernels' entry before
    a kernel runs (the CUDA kernel and the reference raised RuntimeError there, the Triton kernel ValueError)."""
    params, fishers = make_models(2, (7,), torch.float32, torch.float32, seed=16)
    moved_list = params if moved == "param" else fishers
    moved_list[1] = moved_list[1].to("meta")
    kernel_calls = []
    backend = SimpleNamespace(fisher_merge=lambda *args: kernel_calls.append(args))
    for merge in (fisher_merge_reference, partial(_merge_with, backend)):
        with pytest.raises(ValueError, match=f"model 1: param on {params[1].device} and Fisher on "
                                             f"{fishers[1].device}; .* device \\(cpu\\)"):
            merge(params, fishers, [1.0, 1.0], [1e-6, 0.0])
    assert not kernel_calls


@pytest.mark.parametrize("fisher_dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_accumulate_adds_scaled_squares(fisher_dtype, grad_dtype):
    g = torch.Generator().manual_seed(17)
    grads = [torch.randn(37, 53, generator=g).to(grad_dtype) for _ in range(4)]
    fisher = torch.zeros(37, 53, dtype=fisher_dtype)
    for grad in grads:
        accumulate_fisher_reference(fisher, grad, 0.25)
    exact = sum(0.25 * grad.double() ** 2 for grad in grads)
    # fp32: 3 roundings per step (square, scale, sum) over 4 steps; a 16-bit Fisher also rounds its
    # running sum to its own precision at every step.
    rel = 12 * U if fisher_dtype == torch.float32 else 4 * 2.0 ** -MANTISSA[fisher_dtype] + 12 * U
    assert ((fisher.double() - exact).abs() <= rel * exact).all()


def test_accumulate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        accumulate_fisher_reference(torch.zeros(3), torch.ones(4), 1.0)


@pytest.mark.parametrize("kernels", ["compiled", "reference"])
def test_accumulate_refuses_shared_memory_and_bad_scales(kernels, monkeypatch):
    """The kernels read grad while they write fisher: memory the two share would feed back (a cascade the
    reference, which reads first, would not show); a NaN or negative scale would make no Fisher."""
    if kernels == "reference":
        monkeypatch.setattr(backends, "cpu_extension", lambda: None)
    buf = torch.full((9,), 0.5)
    with pytest.raises(ValueError, match="share memory"):
        ops.accumulate_fisher(buf[1:], buf[:-1], 1.0)
    for scale in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            ops.accumulate_fisher(torch.zeros(3), torch.ones(3), scale)
    assert torch.equal(buf, torch.full((9,), 0.5))
