"""Sign election, disjoint mean and merge_task_vectors against element-by-element restatements of
the TIES definition (fp64 inputs, so exact comparisons are meaningful up to summation order)."""
import pytest
import torch

from merge_engine import ops


def naive_ties(base, experts, weights, densities, normalize=True, lambda_=1.0):
    """TIES, one element at a time: trim each delta, weight, elect the sign of the sum (0 -> +),
    average the agreeing weighted deltas by the agreeing weights."""
    trimmed = [ops.trim_by_magnitude(e - base, d) * w for e, w, d in zip(experts, weights, densities)]
    out = base.clone().reshape(-1)
    flat = [t.reshape(-1) for t in trimmed]
    for j in range(out.numel()):
        vals = [float(t[j]) for t in flat]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(v, w) for v, w in zip(vals, weights) if v != 0 and (v > 0) == (sign > 0)]
        total = sum(v for v, _ in agree)
        div = sum(w for _, w in agree) if normalize else 1.0
        out[j] += lambda_ * total / (div if div != 0 else 1.0)
    return out.reshape(base.shape)


def models(k, shape, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(k)]


def test_elect_sign_zero_sum_is_plus():
    d = torch.tensor([[1.0, -1.0, 0.0, -2.0], [-1.0, 0.5, 0.0, 1.0]])
    assert ops.elect_sign(d).tolist() == [1.0, -1.0, 1.0, -1.0]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 9)])
def test_ties_matches_elementwise_definition(k, shape):
    base, experts = models(k, shape, seed=k * 10 + len(shape))
    weights = [0.3 + 0.4 * i for i in range(k)]
    densities = [0.2 + 0.15 * i for i in range(k)]
    got = ops.merge_task_vectors(base, experts, weights, densities, "magnitude", True, True, lambda_=0.7)
    # only the order of a K-term sum differs from the definition: a few fp64 ulps
    torch.testing.assert_close(got, naive_ties(base, experts, weights, densities, lambda_=0.7),
                               rtol=1e-12, atol=1e-12)


def test_ties_edge_cases():
    base, experts = models(3, (40,), seed=1)
    kw = dict(sparsify="magnitude", consensus=True, normalize=True)
    # density 0: nothing survives, output is the base
    assert torch.equal(ops.merge_task_vectors(base, experts, [1.0] * 3, [0.0] * 3, **kw), base)
    # an expert equal to the base contributes nothing
    with_zero = ops.merge_task_vectors(base, experts[:2] + [base.clone()], [1.0] * 3, [0.5] * 3, **kw)
    torch.testing.assert_close(with_zero, ops.merge_task_vectors(base, experts[:2], [1.0] * 2, [0.5] * 2, **kw),
                               rtol=0, atol=1e-15)
    # single expert, density 1, weight 1: the expert itself
    torch.testing.assert_close(ops.merge_task_vectors(base, experts[:1], [1.0], [1.0], **kw), experts[0],
                               rtol=0, atol=1e-15)
    # no experts: the base
    assert torch.equal(ops.merge_task_vectors(base, [], [], [], **kw), base)


def test_weights_summing_to_zero_do_not_divide_by_zero():
    base, experts = models(2, (30,), seed=2)
    linear = ops.merge_task_vectors(base, experts, [1.0, -1.0], [1.0, 1.0], normalize=True)
    torch.testing.assert_close(linear, base + (experts[0] - experts[1]), rtol=1e-12, atol=1e-12)
    ties = ops.merge_task_vectors(base, experts, [1.0, -1.0], [1.0, 1.0], "magnitude", True, True)
    assert torch.isfinite(ties).all()
    torch.testing.assert_close(ties, naive_ties(base, experts, [1.0, -1.0], [1.0, 1.0]), rtol=1e-12, atol=1e-12)


def test_task_arithmetic_is_weighted_sum_of_deltas():
    base, experts = models(3, (4, 6), seed=3)
    w = [0.5, 0.25, 1.5]
    got = ops.merge_task_vectors(base, experts, w, [1.0] * 3, lambda_=0.5)
    want = base + 0.5 * sum(wi * (e - base) for wi, e in zip(w, experts))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_random_sparsifiers_are_keyed_by_tensor_and_expert():
    base, experts = models(2, (500,), seed=4)
    same = [base + 1, base + 1]
    out = ops.merge_task_vectors(base, same, [1.0, 1.0], [0.5, 0.5], "random", rescale=False, tensor_name="a")
    # the two experts draw different masks, so the sum has 0, 1 and 2 contributions
    counts = set((out - base).round().unique().tolist())
    assert counts == {0.0, 1.0, 2.0}
    again = ops.merge_task_vectors(base, same, [1.0, 1.0], [0.5, 0.5], "random", rescale=False, tensor_name="a")
    assert torch.equal(out, again)
    other = ops.merge_task_vectors(base, same, [1.0, 1.0], [0.5, 0.5], "random", rescale=False, tensor_name="b")
    assert not torch.equal(out, other)


def test_bf16_ties_computes_in_input_dtype():
    base, experts = models(2, (64,), seed=5)
    b16 = ops.merge_task_vectors(base.bfloat16(), [e.bfloat16() for e in experts], [1.0, 1.0], [0.5, 0.5],
                                 "magnitude", True, True)
    assert b16.dtype == torch.bfloat16


def test_a_non_finite_lambda_is_refused():
    base = torch.zeros(4)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lambda_ = "):
            ops.merge_task_vectors(base, [torch.ones(4)], [1.0], [1.0], lambda_=bad)
