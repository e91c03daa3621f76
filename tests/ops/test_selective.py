"""SCE, RAM, RAM+ (tensor-local) and Arcee Fusion against hand-computed results."""
import pytest
import torch

from merge_engine import ops
from merge_engine.ops.selective import QUANTILE_SAMPLE_SIZE, fusion_importance, fusion_threshold, sce_select_mask
from tests.conftest import torch_default_dtype


def experts(base, *deltas):
    return [base + torch.tensor(d, dtype=base.dtype) for d in deltas]


def test_sce_one_expert_gives_its_nonzero_deltas():
    base = torch.zeros(5, dtype=torch.float64)
    (x,) = experts(base, [0.5, -1.0, 0.0, 2.0, -0.25])
    assert torch.equal(ops.sce_merge(base, [x]), x)


def test_sce_weights_by_mean_square_and_erases_minority_signs():
    base = torch.zeros(4, dtype=torch.float64)
    # mean squares 1 and 4 -> weights 0.2 and 0.8
    a, b = experts(base, [1.0, 1.0, -1.0, 1.0], [2.0, -2.0, 2.0, 2.0])
    got = ops.sce_merge(base, [a, b])
    # sums 3, -1, 1, 3 elect +, -, +, +: position 0 and 3 keep both, 1 and 2 keep b only
    want = torch.tensor([(0.2 * 1 + 0.8 * 2) / 1.0, -2.0, 2.0, (0.2 * 1 + 0.8 * 2) / 1.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


def test_sce_select_keeps_the_highest_variance_positions():
    base = torch.zeros(6, dtype=torch.float64)
    a, b = experts(base, [1.0, 0.1, 3.0, 0.0, -2.0, 0.5], [-1.0, 0.1, 0.0, 0.0, 2.0, 0.4])
    tvs = torch.stack([a, b])
    # variances 1, 0, 2.25, 0, 4, 0.0025: 4 non-zero, int(4 * 0.5) = 2 kept (positions 4 and 2)
    assert sce_select_mask(tvs, 0.5).tolist() == [0, 0, 1, 0, 1, 0]
    got = ops.sce_merge(base, [a, b], select_topk=0.5)
    assert got[[0, 1, 3, 5]].eq(0).all() and got[2] == 3.0
    assert torch.equal(ops.sce_merge(base, [a, b], select_topk=0.0), base)
    assert torch.equal(sce_select_mask(tvs, 1.0), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sce_select_needs_no_sort_of_the_selection(monkeypatch, dtype):
    """On a GPU torch.topk sorts its k results in one dimension, which takes at most 2**31 - 1 values: SCE's
    selection of a fused MoE tensor passes that. Emulated here with a topk that refuses to sort more than 8
    values: the mask is mergekit's (a sorted topk's) all the same, with many tied variances, for k on both sides
    of the CPU's switch from a partial sort to a selection (k * 64 <= n)."""
    g = torch.Generator().manual_seed(16)
    n = 2000
    tvs = (torch.randint(-3, 4, (3, n), generator=g) * 0.25).to(dtype)
    fractions = [0.01, 0.2, 0.7]
    var = torch.var(tvs, dim=0, unbiased=False).abs()
    want = []
    for fraction in fractions:
        mask = torch.zeros(n, dtype=dtype)
        mask[torch.topk(var, int(torch.count_nonzero(var) * fraction), largest=True).indices] = 1
        want.append(mask)
    topk = torch.topk

    def bounded_topk(x, k, *args, sorted=True, **kwargs):
        if sorted and k > 8:
            raise RuntimeError(f"Cannot sort dimension of length {k}")
        return topk(x, k, *args, sorted=sorted, **kwargs)

    monkeypatch.setattr(torch, "topk", bounded_topk)
    for fraction, mask in zip(fractions, want):
        assert torch.equal(sce_select_mask(tvs, fraction), mask), fraction


def test_sce_with_no_experts_or_equal_experts_gives_the_base():
    base = torch.randn(3, 4)
    assert torch.equal(ops.sce_merge(base, []), base)
    assert torch.equal(ops.sce_merge(base, [base.clone(), base.clone()]), base)


def test_ram_sums_unique_entries_and_averages_shared_ones():
    base = torch.full((5,), 1.0, dtype=torch.float64)
    a, b, c = experts(base, [0.5, 0.0, 0.2, 1e-6, 0.0], [0.0, -0.4, 0.4, 0.3, 0.0], [0.0, 0.0, 0.6, 0.0, 1e-7])
    got = ops.ram_merge(base, [a, b, c])
    # entry 3: a's 1e-6 is under epsilon, so b's 0.3 is unique; entry 4: nothing active
    want = base + torch.tensor([0.5, -0.4, (0.2 + 0.4 + 0.6) / 3, 0.3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    # a larger epsilon deactivates more: 0.2 and 0.3 drop out
    want = base + torch.tensor([0.5, -0.4, (0.4 + 0.6) / 2, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ops.ram_merge(base, [a, b, c], epsilon=0.35), want, rtol=1e-15, atol=0)


def test_ram_one_expert_is_task_arithmetic_above_epsilon():
    base = torch.randn(4, 6, dtype=torch.float64)
    x = base + 0.1 * torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(ops.ram_merge(base, [x]), x, rtol=1e-15, atol=1e-15)
    assert torch.equal(ops.ram_merge(base, []), base)


def test_ramplus_scales_unique_entries_by_the_shared_to_unique_ratio():
    base = torch.zeros(6, dtype=torch.float64)
    # a: unique at 0, 1; shared at 2 -> rho 1/2; b: unique at 3, shared at 2 -> rho 1
    a, b = experts(base, [1.0, 2.0, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.3, 4.0, 0.0, 0.0])
    got = ops.ramplus_tl_merge(base, [a, b], r=0.2, alpha=0.8)
    want = torch.tensor([1.0 * 1.1, 2.0 * 1.1, 0.4, 4.0 * (1 + 0.2 * 0.8), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=0)  # the scale is computed in fp32, as in mergekit
    # alpha caps rho; r = 0 is plain RAM
    capped = ops.ramplus_tl_merge(base, [a, b], r=0.2, alpha=0.25)
    torch.testing.assert_close(capped[[0, 3]], torch.tensor([1.05, 4.2], dtype=torch.float64), rtol=1e-7, atol=0)
    torch.testing.assert_close(ops.ramplus_tl_merge(base, [a, b], r=0.0), ops.ram_merge(base, [a, b]), rtol=0, atol=0)


def test_ram_dtypes_follow_mergekit():
    base = torch.randn(4, 4).bfloat16()
    x = (base.float() + 0.1).bfloat16()
    assert ops.ram_merge(base, [x, x]).dtype == torch.bfloat16
    assert ops.ramplus_tl_merge(base, [x, x]).dtype == torch.float32  # the fp32 scale promotes
    assert ops.ramplus_tl_merge(base.double(), [x.double()]).dtype == torch.float64


def test_ramplus_ignores_the_callers_default_dtype():
    """The scale is fp32 whatever torch's default dtype (an integer ratio would take it)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 8, generator=g)
    xs = [base + 0.1 * torch.randn(8, 8, generator=g) * (torch.rand(8, 8, generator=g) > 0.5) for _ in range(2)]
    want = ops.ramplus_tl_merge(base, xs, r=0.3, alpha=0.9)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = ops.ramplus_tl_merge(base, xs, r=0.3, alpha=0.9)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_fusion_importance_is_delta_times_row_kl():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g, dtype=torch.float64)
    other = base + torch.randn(3, 5, generator=g, dtype=torch.float64)
    p, q = other.softmax(-1), base.softmax(-1)
    kl = (p * (p / q).log()).sum(-1, keepdim=True)
    torch.testing.assert_close(fusion_importance(base, other), (other - base).abs() * kl, rtol=1e-6, atol=1e-9)
    assert torch.equal(fusion_importance(base, base), torch.zeros_like(base))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, QUANTILE_SAMPLE_SIZE + 12345])
def test_fusion_threshold_is_median_plus_iqr_of_lower_quantiles(n):
    # quantile q is the element at sorted index int(q (n - 1)): torch.quantile's 'lower'; above the
    # sampling size mergekit samples, we keep the exact quantiles
    x = torch.rand(n, generator=torch.Generator().manual_seed(n))
    q1, median, q3 = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75]), interpolation="lower")
    assert torch.equal(fusion_threshold(x), median + 1.5 * (q3 - q1))


def test_arcee_fusion_keeps_the_base_except_at_outlier_importance():
    base = torch.zeros(2, 50, dtype=torch.float64)
    other = base.clone()
    other[0, 7], other[1, 30] = 3.0, -0.5  # one large change per row; the rest equal the base
    got = ops.arcee_fusion(base, other)
    # importance is zero outside the two changes, so the threshold is 0 and every element passes:
    # unchanged elements stay the base, changed ones take the other model's value
    assert torch.equal(got, other)
    noisy = other + 1e-3 * torch.randn(2, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = ops.arcee_fusion(base, noisy)
    imp = fusion_importance(base, noisy)
    taken = imp >= fusion_threshold(imp)
    assert taken[0, 7] and taken[1, 30] and 0 < int(taken.sum()) < 100
    assert torch.equal(got[~taken], base[~taken]) and torch.equal(got[taken], noisy[taken])
    assert torch.equal(ops.arcee_fusion(base, base), base)


@pytest.mark.parametrize("shape", [(0,), (0, 8), (8, 0)])
def test_arcee_fusion_of_empty_tensors_is_empty(shape):
    base = torch.empty(shape, dtype=torch.bfloat16)
    got = ops.arcee_fusion(base, base.clone())
    assert got.shape == shape and got.dtype == torch.float32


def test_arcee_fusion_mask_is_fp32_like_mergekit():
    base = torch.randn(4, 8).bfloat16()
    assert ops.arcee_fusion(base, (base.float() + 0.5).bfloat16()).dtype == torch.float32
    assert ops.arcee_fusion(base.double(), base.double() + 1).dtype == torch.float64
    with pytest.raises(ValueError, match="differ"):
        ops.arcee_fusion(base, base[:2])


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16])
def test_sce_and_arcee_fusion_do_not_depend_on_torchs_default_dtype(default):
    # before, SCE's count of positions to keep and Arcee Fusion's quantile ranks were computed in the default dtype: a
    # caller's torch.set_default_dtype(torch.bfloat16), or transformers building a bf16 model in another thread,
    # changed which positions SCE kept and the fusion threshold (fp16: an error)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(257, 1031, generator=g)
    others = [base + 0.01 * torch.randn(257, 1031, generator=g) for _ in range(3)]
    want = ops.sce_merge(base, others, 0.5), ops.arcee_fusion(base, others[0])
    with torch_default_dtype(default):
        got = ops.sce_merge(base, others, 0.5), ops.arcee_fusion(base, others[0])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
