"""Closed forms of RegMean and BMM (merge_engine/ops/regression.py) against direct fp64 least-squares
solves and their limits.

Tolerances: the solves run in float64 (the default); on random well-conditioned problems (tokens > d,
condition numbers ~1e2-1e3) the difference from torch.linalg.lstsq in fp64 is ~1e-13 relative; 1e-9
leaves ample margin yet fails at once for any wrong term (those are O(1)).
"""
import zlib

import pytest
import torch

from merge_engine.ops import regression

RTOL = 1e-9


def problem(seed, experts=3, out=5, d=7, tokens=20):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out, d, generator=g, dtype=torch.float64) for _ in range(experts)]
    inputs = [torch.randn(tokens, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)
              for _ in range(experts)]
    return weights, inputs, [x.T @ x for x in inputs]


def close(a, b, rtol=RTOL):
    return float((a - b).abs().max()) <= rtol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("experts, out, d, tokens", [(1, 3, 4, 9), (3, 5, 7, 20), (4, 13, 33, 50)])
def test_regmean_alpha_1_is_the_least_squares_solution(experts, out, d, tokens):
    seed = zlib.crc32(repr((experts, out, d, tokens)).encode())
    weights, inputs, grams = problem(seed, experts, out, d, tokens)
    x = torch.cat(inputs)
    y = torch.cat([xi @ w.T for xi, w in zip(inputs, weights)])
    direct = torch.linalg.lstsq(x, y).solution.T
    assert close(regression.regmean(weights, grams, alpha=1.0), direct), f"seed {seed}"


def test_regmean_alpha_shrinks_off_diagonals_as_defined():
    weights, _, grams = problem(3)
    alpha = 0.9
    shrunk = [g * alpha + torch.diag(torch.diagonal(g)) * (1 - alpha) for g in grams]
    expected = sum(w @ g for w, g in zip(weights, shrunk)) @ torch.linalg.inv(sum(shrunk))
    assert close(regression.regmean(weights, grams, alpha), expected)


def test_identical_grams_and_alpha_1_give_the_average():
    weights, _, grams = problem(4)
    merged = regression.regmean(weights, [grams[0]] * len(weights), alpha=1.0)
    assert close(merged, sum(weights) / len(weights))


@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0])
def test_one_expert_gives_that_expert(alpha):
    weights, _, grams = problem(5, experts=1)
    assert close(regression.regmean(weights, grams, alpha), weights[0])


def test_bmm_is_the_map_of_the_anchored_regression():
    weights, inputs, grams = problem(6)
    anchor = torch.randn(weights[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(60))
    lam = 0.7
    # MAP = least squares on the data rows plus sqrt(lam) I rows pulling W towards the anchor
    d = anchor.shape[1]
    x = torch.cat(inputs + [torch.eye(d, dtype=torch.float64) * lam ** 0.5])
    y = torch.cat([xi @ w.T for xi, w in zip(inputs, weights)] + [anchor.T * lam ** 0.5])
    assert close(regression.bmm(weights, grams, anchor, lam), torch.linalg.lstsq(x, y).solution.T)


def test_bmm_limits():
    weights, _, grams = problem(7)
    anchor = torch.randn(weights[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(70))
    # lam -> inf: the anchor; the gap shrinks like |S| / lam
    assert close(regression.bmm(weights, grams, anchor, 1e12), anchor, rtol=1e-8)
    assert close(regression.bmm(weights, grams, anchor, 0.0), regression.regmean(weights, grams, alpha=1.0))
    assert close(regression.bmm(weights, grams, anchor, 1e-12), regression.regmean(weights, grams, alpha=1.0), rtol=1e-8)


def test_a_singular_gram_still_gives_a_finite_answer():
    weights, _, grams = problem(8, experts=2, d=12, tokens=3)  # rank 6 < 12
    merged = regression.regmean(weights, grams, alpha=1.0)
    assert torch.isfinite(merged).all()
    # it still fits the data: on the tokens' span the merged map is the least-squares one
    _, inputs, _ = problem(8, experts=2, d=12, tokens=3)
    x = torch.cat(inputs)
    y = torch.cat([xi @ w.T for xi, w in zip(inputs, weights)])
    best = torch.linalg.lstsq(x, y, driver="gelsd").solution.T
    assert float((x @ merged.T - x @ best.T).abs().max()) < 1e-6 * float(y.abs().max())


def test_a_zero_gram_is_handled_and_a_nan_one_refused():
    w = torch.randn(2, 3, dtype=torch.float64)
    assert torch.isfinite(regression.regmean([w], [torch.zeros(3, 3, dtype=torch.float64)])).all()
    with pytest.raises(ValueError, match="not positive semi-definite"):
        regression.regmean([w], [torch.full((3, 3), float("nan"), dtype=torch.float64)])


def test_task_vector_gram_is_trace_scaled_and_spans_the_task_vector_rows():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 8, generator=g)
    expert = base + torch.randn(6, 1, generator=g) @ torch.randn(1, 8, generator=g)  # rank-1 task vector
    gram = regression.task_vector_gram(expert, base)
    assert abs(float(torch.trace(gram)) - 8) < 1e-9
    assert int(torch.linalg.matrix_rank(gram)) == 1
    assert torch.equal(regression.task_vector_gram(base, base), torch.zeros(8, 8, dtype=torch.float64))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="model 1"):
        regression.regmean([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.eye(3), torch.eye(4)])
    with pytest.raises(ValueError, match="lambda"):
        regression.bmm([torch.zeros(2, 3)], [torch.eye(3)], torch.zeros(2, 3), -1.0)
