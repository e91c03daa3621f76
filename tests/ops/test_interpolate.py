"""Weighted sum, slerp and nuslerp against their closed forms (fp64 inputs)."""
import math

import pytest
import torch

from merge_engine import ops
from merge_engine.ops import interpolate


def pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def closed_form_slerp(t, a, b):
    ua, ub = a / a.norm(), b / b.norm()
    theta = torch.acos((ua * ub).sum().clamp(-1, 1))
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def test_weighted_sum_normalizes_and_keeps_dtype():
    a, b = pair((5, 3), 0)
    torch.testing.assert_close(ops.weighted_sum([a, b], [1.0, 3.0]), (a + 3 * b) / 4, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.weighted_sum([a, b], [1.0, 3.0], False), a + 3 * b, rtol=1e-12, atol=1e-12)
    assert ops.weighted_sum([a.bfloat16(), b.bfloat16()], [0.5, 0.5]).dtype == torch.bfloat16


def test_weighted_sum_and_slerp_of_fp64_inputs_compute_in_fp64():
    """As their docstrings say: fp32 accumulation, fp64 for fp64 inputs (a 2^-40 term survives)."""
    one, tiny = torch.ones(3, dtype=torch.float64), torch.full((3,), 2.0 ** -40, dtype=torch.float64)
    assert torch.equal(ops.weighted_sum([one, tiny], [1.0, 1.0], False), one + tiny)
    assert "fp64 for fp64" in ops.weighted_sum.__doc__ and "fp64 for fp64" in ops.slerp.__doc__


@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_sum_in_chunks_is_the_whole_tensor_sum_bit_for_bit(normalize):
    """Across chunk boundaries (2.4 chunks, odd length) and into a caller's buffer: the chunked sum is
    the same elementwise arithmetic as one fp32 sum of whole tensors, so every bf16 bit agrees."""
    n = 2 * interpolate._CHUNK + 409_601
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, generator=g).bfloat16() for _ in range(3)]
    weights = [0.7, -0.2, 0.45]
    w = torch.tensor(weights, dtype=torch.float64).float()
    whole = torch.zeros(n)
    for x, wi in zip(xs, w):
        whole.addcmul_(x, wi)
    if normalize:
        whole.div_(w.sum())
    buffer = torch.empty(n, dtype=torch.bfloat16)
    got = ops.weighted_sum(xs, weights, normalize, out=buffer)
    assert got is buffer
    assert torch.equal(got.view(torch.int16), whole.bfloat16().view(torch.int16))


@pytest.mark.parametrize("shape", [(1,), (7,), (13, 11)])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_closed_form(shape, t):
    a, b = pair(shape, 1)
    if a.numel() == 1:  # two scalars are (anti)parallel: slerp degenerates to lerp
        torch.testing.assert_close(ops.slerp(t, a, b), (1 - t) * a + t * b)
        return
    torch.testing.assert_close(ops.slerp(t, a, b), closed_form_slerp(t, a, b), rtol=1e-10, atol=1e-12)


def test_slerp_parallel_is_linear_and_handles_zero():
    a, _ = pair((20,), 2)
    torch.testing.assert_close(ops.slerp(0.25, a, 2 * a), 0.75 * a + 0.5 * a)
    z = torch.zeros(20, dtype=torch.float64)
    assert torch.isfinite(ops.slerp(0.5, a, z)).all()


def test_nuslerp_row_wise_and_flattened():
    a, b = pair((4, 6), 3)
    flat = ops.nuslerp(0.4, a, b, flatten=True)
    torch.testing.assert_close(flat, closed_form_slerp(0.4, a.reshape(-1), b.reshape(-1)).reshape(4, 6))
    rows = ops.nuslerp(0.4, a, b, flatten=False)
    for i in range(4):
        torch.testing.assert_close(rows[i], closed_form_slerp(0.4, a[i], b[i]))
    cols = ops.nuslerp(0.4, a, b, row_wise=True, flatten=False)
    for j in range(6):
        torch.testing.assert_close(cols[:, j], closed_form_slerp(0.4, a[:, j], b[:, j]))


def test_slerp_preserves_norm_of_equal_norm_inputs():
    a, b = pair((100,), 4)
    b = b * (a.norm() / b.norm())
    assert math.isclose(float(ops.slerp(0.5, a, b).norm()), float(a.norm()), rel_tol=1e-12)


def unit(x):
    return x / x.norm()


def test_multislerp_of_two_is_normalized_lerp_scaled_by_mean_norm():
    # the tangent-space mean of two points at their normalized weighted mean is zero, so the
    # direction is nlerp(w) of the unit vectors and the length the weighted mean of the norms
    a, b = pair((6, 5), 5)
    got = ops.multislerp([a, b], [1.0, 3.0])
    want = (0.25 * a.norm() + 0.75 * b.norm()) * unit(0.25 * unit(a) + 0.75 * unit(b))
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)  # eps = 1e-8 is added to the norms


def test_multislerp_of_two_equal_norm_halves_is_slerp_and_nuslerp():
    a, b = pair((40,), 6)
    b = b * (a.norm() / b.norm())
    got = ops.multislerp([a, b], [0.5, 0.5])
    torch.testing.assert_close(got, ops.slerp(0.5, a, b), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, ops.nuslerp(0.5, a, b), rtol=1e-10, atol=1e-12)
    # unequal weights: nlerp, not slerp (the directions differ)
    assert not torch.allclose(unit(ops.multislerp([a, b], [0.8, 0.2])), unit(ops.slerp(0.2, a, b)), atol=1e-6)


def test_multislerp_norm_is_weighted_mean_norm_and_base_is_an_origin():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(9, 4, generator=g, dtype=torch.float64) * s for s in (1.0, 2.0, 0.5)]
    w = [0.2, 0.5, 0.3]
    got = ops.multislerp(xs, w)
    assert math.isclose(float(got.norm()), sum(wi * float(x.norm()) for wi, x in zip(w, xs)), rel_tol=1e-12)
    base = torch.randn(9, 4, generator=g, dtype=torch.float64)
    with_base = ops.multislerp([x + base for x in xs], w, base)
    torch.testing.assert_close(with_base, got + base, rtol=1e-10, atol=1e-12)
    # weights are normalized by default; unnormalized weights scale the length by their sum
    torch.testing.assert_close(ops.multislerp(xs, [2 * v for v in w]), got)
    torch.testing.assert_close(ops.multislerp(xs, [2 * v for v in w], normalize_weights=False), 2 * got)


def test_multislerp_identical_inputs_single_input_and_antipodes():
    a, _ = pair((12,), 8)
    torch.testing.assert_close(ops.multislerp([a, a, a], [0.1, 0.3, 0.6]), a, rtol=1e-12, atol=1e-12)
    b = a + 1
    out = ops.multislerp([b], [0.3], a)  # one input: returned as is, the base unused
    assert torch.equal(out, b) and out.data_ptr() != b.data_ptr()
    # antipodal pair with equal weights: mergekit's fallback is the weighted sum
    torch.testing.assert_close(ops.multislerp([a, -a], [0.5, 0.5]), torch.zeros_like(a))
    with pytest.raises(ValueError, match="weighted mean"):
        ops.multislerp([a, -a, a, -a], [0.25] * 4)


def test_multislerp_keeps_dtype():
    a, b = pair((8, 8), 9)
    assert ops.multislerp([a.bfloat16(), b.bfloat16()], [0.5, 0.5]).dtype == torch.bfloat16


def test_karcher_of_identical_inputs_is_that_input():
    a, _ = pair((7, 3), 10)
    torch.testing.assert_close(ops.karcher_mean([a, a, a], [1 / 3] * 3), a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w", [0.5, 0.2, 0.9])
def test_karcher_of_two_is_on_the_geodesic_at_the_weight(w):
    # the weighted Frechet mean of two points on a sphere is slerp(w2) of them
    a, b = pair((30,), 11)
    got = ops.karcher_mean([a, b], [1 - w, w], max_iter=100, tol=1e-12)
    scale = (1 - w) * a.norm() + w * b.norm()
    torch.testing.assert_close(got, scale * ops.slerp(w, unit(a), unit(b)), rtol=1e-9, atol=1e-10)


def test_karcher_three_inputs_is_a_fixed_point_and_zero_inputs_only_scale():
    g = torch.Generator().manual_seed(12)
    xs = [torch.randn(20, generator=g, dtype=torch.float64) for _ in range(3)]
    got = ops.karcher_mean(xs, [1 / 3] * 3, max_iter=200, tol=1e-14)
    m = unit(got)
    # at the Karcher mean the mean of the log maps vanishes
    logs = []
    for x in xs:
        u = unit(x)
        theta = torch.arccos((m @ u).clamp(-1, 1))
        logs.append(theta / torch.sin(theta) * (u - (m @ u) * m))
    assert float(sum(logs).norm()) < 1e-10
    assert math.isclose(float(got.norm()), sum(float(x.norm()) for x in xs) / 3, rel_tol=1e-12)
    # a zero input takes no part in the direction but its weight still counts in the scale
    z = torch.zeros_like(xs[0])
    torch.testing.assert_close(ops.karcher_mean([xs[0], z], [0.5, 0.5]), 0.5 * xs[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(ops.karcher_mean([z, z], [0.5, 0.5]), z)


def test_karcher_keeps_dtype():
    a, b = pair((8, 8), 13)
    assert ops.karcher_mean([a.bfloat16(), b.bfloat16()], [0.5, 0.5]).dtype == torch.bfloat16
    assert ops.karcher_mean([a.float(), b.float()], [0.5, 0.5]).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_karcher_dots_past_a_devices_bound_on_one_call_go_in_pieces(monkeypatch, dtype):
    """torch.dot on a GPU is one cuBLAS call and refuses more than 2**31 - 1 elements, which a fused MoE tensor
    passes: karcher_mean dots longer tensors there in pieces. Here on the CPU with that bound lowered to 8 elements
    (torch.dot refusing more, as on the GPU): the mean and the dots are the one-call ones, to rounding."""
    g = torch.Generator().manual_seed(15)
    xs = [torch.randn(5, 7, generator=g, dtype=dtype) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    want, want_dot = ops.karcher_mean(xs, weights), torch.dot(xs[0].flatten(), xs[1].flatten())
    one_call = torch.dot

    def bounded_dot(a, b):
        if a.numel() > 8:
            raise RuntimeError("dot only supports n, incx, incy with the bound [val] <= 8")
        return one_call(a, b)

    monkeypatch.setattr(interpolate, "_DOT_LIMITS", {"cpu": 8}, raising=False)
    monkeypatch.setattr(interpolate, "_DOT_PIECE", 3, raising=False)
    monkeypatch.setattr(torch, "dot", bounded_dot)
    tight = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.karcher_mean(xs, weights), want, **tight)
    torch.testing.assert_close(interpolate._dot(xs[0].flatten(), xs[1].flatten()), want_dot, **tight)


def test_karcher_of_tensors_of_different_dtypes_is_refused_by_name():
    a, b = pair((8, 8), 14)
    with pytest.raises(ValueError, match="karcher_mean: tensor 1 is torch.bfloat16, tensor 0 torch.float32"):
        ops.karcher_mean([a.float(), b.bfloat16()], [0.5, 0.5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_karcher_of_zero_dim_tensors_keeps_dtype(dtype):
    """The fp32 scale times a 0-dim unit is promoted as two 0-dim tensors are (to fp32), where a tensor with dims
    keeps its dtype: the op's declared (fake) result is the input dtype, which a compiled caller allocates."""
    a, b = torch.tensor(0.75, dtype=dtype), torch.tensor(-2.5, dtype=dtype)
    got = ops.karcher_mean([a, b], [0.5, 0.5])
    assert got.dtype == dtype and got.shape == ()
    assert got == ops.karcher_mean([a.float(), b.float()], [0.5, 0.5]).to(dtype)  # exact inputs, one rounding
    torch.library.opcheck(torch.ops.merge_engine.karcher_mean.default, ([a, b], [0.5, 0.5]))


def test_nearswap_takes_close_elements_from_the_other_model():
    base = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    other = torch.tensor([0.1, -0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    # w = clamp(t / |base - other|, 0, 1): 1 for |diff| <= t, else t / |diff|
    want = torch.tensor([0.1, -0.2, 0.2, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ops.nearswap(0.2, base, other), want)
    a, b = pair((6, 7), 14)
    assert torch.equal(ops.nearswap(1e9, a, b), b)
    assert torch.equal(ops.nearswap(0.0, a, b), a)
    assert ops.nearswap(0.1, a.bfloat16(), b.bfloat16()).dtype == torch.bfloat16


def test_weighted_sum_refuses_weights_that_cancel_or_overflow():
    """normalize divides by the weights' sum: 0 would make every value Inf or NaN; a weight past fp32's range
    would be Inf in the fp32 accumulation. Refused, as multislerp and the engine's planner do."""
    a, b = torch.randn(5), torch.randn(5)
    with pytest.raises(ValueError, match="sum to 0"):
        ops.weighted_sum([a, b], [1.0, -1.0])
    assert torch.isfinite(ops.weighted_sum([a, b], [1.0, -1.0], normalize=False)).all()
    with pytest.raises(ValueError, match="must be finite in torch.float32"):
        ops.weighted_sum([a, b], [1e300, 1.0])
