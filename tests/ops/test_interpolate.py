"""Weighted sum, slerp and nuslerp against their closed forms (fp64 inputs)."""
import math

import pytest
import torch

from merge_engine import ops


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
