"""Sparsification references: exact kept-set properties, the tie rule, edge cases, determinism; the mode
codes the kernels share."""
import pathlib
import re

import pytest
import torch

from merge_engine import ops
from merge_engine.ops.consensus import merge_task_vectors_reference
from merge_engine.ops.select import NOTHING_LARGEST, NOTHING_SMALLEST
from merge_engine.ops.sparsify import SPARSIFY_CODES, topk_count
from tests.conftest import DTYPES, pairwise, torch_default_dtype

SIZES = [(1,), (7,), (1023,), (13, 17), (4, 5, 3)]  # odd sizes, and 2-D and 3-D shapes (the ops flatten)


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# every density (none kept, one, some, all but one, all) on every shape and dtype: a pairwise covering set
@pytest.mark.parametrize("shape, dtype, density", pairwise(SIZES, DTYPES, [0.0, 0.01, 0.3, 0.999, 1.0]))
def test_trim_keeps_exactly_the_k_largest(shape, dtype, density):
    x = rand(shape, dtype, seed=hash((shape, density)) % 1000)
    y = ops.trim_by_magnitude(x, density)
    kept = y != 0
    n = x.numel()
    expected = n if density >= 1 else 0 if density <= 0 else topk_count(n, density)
    assert int(kept.sum()) == expected
    assert torch.equal(y[kept], x[kept])  # kept values untouched
    if 0 < expected < n:
        assert x.abs()[kept].min() >= x.abs()[~kept].max()


def test_tie_rule_lower_index_wins():
    x = torch.tensor([1.0, -2.0, 2.0, 2.0, -2.0, 0.5])
    mask = ops.magnitude_topk_mask(x, 3)
    assert mask.tolist() == [False, True, True, True, False, False]
    assert ops.magnitude_topk_mask(torch.zeros(5), 2).tolist() == [True, True, False, False, False]


def test_trim_keeps_at_least_one_and_handles_zero_tensor():
    x = torch.zeros(10)
    assert torch.equal(ops.trim_by_magnitude(x, 0.01), x)
    y = ops.trim_by_magnitude(torch.arange(10.0), 0.01)  # int(0.1) = 0 -> max(1, 0) = 1 kept
    assert y.nonzero().flatten().tolist() == [9]


def test_rescale_l1_preserves_norm():
    x = rand((50,), torch.float64, 1)
    y = ops.trim_by_magnitude(x, 0.3, rescale=True)
    assert torch.allclose(y.abs().sum(), x.abs().sum())
    assert torch.equal(y != 0, ops.trim_by_magnitude(x, 0.3) != 0)


def mergekit_rescale(x, mask, work):
    """mergekit 0.1.5's rescaled_masked_tensor on x.to(work) (its bernoulli and della_magprune work in fp32 for
    fp16 tensors on the CPU; its magnitude and magnitude_outliers in the tensor's dtype), back in x's dtype."""
    t = x.to(work)
    masked = t * mask.to(work)
    before, after = t.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked.to(x.dtype)
    return (masked * (before / after)).to(x.dtype)


# |delta| ~ 0.1 (a sum of ~650 over 8192 elements) and ~3 (~96000, past fp16's 65504 over 40000 elements)
FP16_DELTAS = {"in range": (8192, 0.1), "past fp16": (40_000, 3.0)}


@pytest.mark.parametrize("case", FP16_DELTAS)
@pytest.mark.parametrize("sparsifier", ["random", "rank"])
def test_fp16_drawn_rescale_is_mergekits_fp32_work(case, sparsifier):
    n, scale = FP16_DELTAS[case]
    x = (scale * rand((n,), torch.float32, 11)).half()
    if sparsifier == "random":
        y = ops.drop_random(x, 0.4, 3, "w", 1, rescale=True)
        mask = ops.drop_random(x, 0.4, 3, "w", 1, rescale=False) != 0
    else:
        y = ops.drop_by_rank(x.reshape(64, -1), 0.4, 0.1, 3, "w", 1, rescale=True).flatten()
        mask = ops.drop_by_rank(x.reshape(64, -1), 0.4, 0.1, 3, "w", 1, rescale=False).flatten() != 0
    assert torch.isfinite(y).all()
    assert torch.equal(y, mergekit_rescale(x, mask, torch.float32))


@pytest.mark.parametrize("case", FP16_DELTAS)
@pytest.mark.parametrize("sparsifier", ["magnitude", "outliers"])
def test_fp16_cutoff_rescale_is_mergekits_until_its_norm_overflows(case, sparsifier):
    """mergekit rescales TIES's and breadcrumbs' fp16 deltas in fp16: the same bits while the norms fit; past
    65504 its factor (Inf over the kept norm) makes every kept value Inf or NaN, where the engine takes the
    norms in fp32."""
    n, scale = FP16_DELTAS[case]
    x = (scale * rand((n,), torch.float32, 12)).half()
    y = ops.trim_by_magnitude(x, 0.3, rescale=True) if sparsifier == "magnitude" else ops.trim_outliers(x, 0.3, 0.01, True)
    mask = (ops.trim_by_magnitude(x, 0.3) if sparsifier == "magnitude" else ops.trim_outliers(x, 0.3, 0.01)) != 0
    fp16 = mergekit_rescale(x, mask, torch.float16)
    if case == "in range":
        assert torch.equal(y, fp16)
    else:
        assert not torch.isfinite(fp16[mask]).any() and torch.isfinite(y).all()
        assert torch.equal(y, mergekit_rescale(x, mask, torch.float32))


@pytest.mark.parametrize("shape", [(1,), (100,), (31, 7)])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.9, 0.05), (0.2, 0.3), (0.1, 0.0)])
def test_outlier_window(shape, density, gamma):
    x = rand(shape, torch.float32, 3)
    y = ops.trim_outliers(x, density, gamma)
    n = x.numel()
    target = int(density * n)
    n_top = n - max(0, n - target - int(gamma * n)) - target  # elements above the window
    kept = y != 0
    assert int(kept.sum()) == target
    mags = x.abs().flatten()
    order = mags.argsort(descending=True)
    assert not kept.flatten()[order[:n_top]].any()  # the largest n_top were dropped
    if target:
        assert torch.equal(y[kept], x[kept])


def test_outliers_density_one_is_identity():
    x = rand((9,), torch.float32, 4)
    assert torch.equal(ops.trim_outliers(x, 1.0, 0.1), x)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_drop_random_rate_and_determinism(density):
    x = torch.ones(20000)
    y = ops.drop_random(x, density, 0, "t", 0, rescale=False)
    # 20000 Bernoulli(p) draws: std of the rate <= 0.0036; 0.02 is > 5 sigma.
    assert abs(float((y != 0).float().mean()) - density) < 0.02
    assert torch.equal(y, ops.drop_random(x, density, 0, "t", 0, rescale=False))
    assert not torch.equal(y, ops.drop_random(x, density, 0, "t", 1, rescale=False))
    assert not torch.equal(y, ops.drop_random(x, density, 1, "t", 0, rescale=False))


def test_drop_random_mask_does_not_depend_on_dtype_or_values():
    a = rand((333,), torch.float32, 5)
    masks = [ops.drop_random(a.to(dt), 0.4, 9, "w", 2, rescale=False) != 0 for dt in DTYPES]
    assert all(torch.equal(m, masks[0]) for m in masks)


def test_drop_random_rescale_matches_l1():
    x = rand((1000,), torch.float64, 6)
    y = ops.drop_random(x, 0.3, 0, "w", 0, rescale=True)
    assert torch.allclose(y.abs().sum(), x.abs().sum())


def test_della_keep_probability_by_row_rank():
    x = torch.tensor([[3.0, -1.0, 2.0], [0.0, 5.0, -4.0]])
    p = ops.della_keep_probability(x, 0.5, 0.1)
    expected = torch.tensor([[0.6, 0.4, 0.5], [0.4, 0.6, 0.5]])
    assert torch.allclose(p, expected)
    assert torch.allclose(ops.della_keep_probability(torch.ones(3, 1), 0.5, 0.1), torch.full((3, 1), 0.4))


def test_drop_by_rank_keeps_large_magnitudes_more_often():
    x = torch.arange(1, 1001, dtype=torch.float32).repeat(40, 1)  # every row ranks the same way
    kept = (ops.drop_by_rank(x, 0.5, 0.4, 0, "w", 0, rescale=False) != 0).float().mean(dim=0)
    # keep probabilities 0.1 (smallest) .. 0.9 (largest), 40 draws each
    assert float(kept[:100].mean()) < 0.3 and float(kept[-100:].mean()) > 0.7
    with pytest.raises(ValueError, match="della"):
        ops.drop_by_rank(x, 0.5, 0.6, 0, "w", 0)


def header_constants() -> dict[str, int]:
    """Enumerators and constexpr integers of csrc/task_vectors.h, by name."""
    text = (pathlib.Path(__file__).parents[2] / "csrc" / "task_vectors.h").read_text()
    enum = re.search(r"enum Mode : int \{([^}]*)\}", text)[1]
    found = {name: int(value) for name, value in re.findall(r"(k\w+) = (-?\d+)", enum)}
    for name, value in re.findall(r"constexpr int64_t (k\w+) = (INT64_MAX|-?\d+);", text):
        found[name] = (1 << 63) - 1 if value == "INT64_MAX" else int(value)
    return found


def test_the_compiled_kernels_use_the_python_mode_codes():
    header = header_constants()
    names = {"": "kNone", "magnitude": "kMagnitude", "random": "kRandom", "outliers": "kOutliers", "rank": "kRank"}
    assert {names[s]: code for s, code in SPARSIFY_CODES.items()} == {k: header[k] for k in names.values()}
    assert (header["kNothingLargest"], header["kNothingSmallest"]) == (NOTHING_LARGEST, NOTHING_SMALLEST)


def test_the_triton_kernels_use_the_python_mode_codes():
    tv = pytest.importorskip("merge_engine.triton_kernels.task_vectors")
    names = {"": "NONE", "magnitude": "MAGNITUDE", "random": "RANDOM", "outliers": "OUTLIERS", "rank": "RANK"}
    assert {s: getattr(tv, names[s]) for s in SPARSIFY_CODES} == SPARSIFY_CODES


@pytest.mark.parametrize("shape", [(7,), (4, 9), (3, 5, 4), (2, 3, 2, 5)])
def test_della_ranks_along_dim_1_as_mergekit(shape):
    """mergekit 0.1.5's della_magprune argsorts |delta| along dim 1 (a 1-D tensor unsqueezed to one row),
    so in 3 or more dims each x[i, :, k...] is ranked on its own; written here with mergekit's formula."""
    x = rand(shape, torch.float32, 21)
    t = x.unsqueeze(0) if x.dim() < 2 else x
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1), dim=1).float() + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    want = (0.4 - 0.1) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * 0.1
    torch.testing.assert_close(ops.della_keep_probability(x, 0.4, 0.1), want.reshape(shape), rtol=0, atol=1e-7)
    merged = ops.merge_task_vectors(torch.zeros(shape), [x], [1.0], [0.4], "rank", epsilons=[0.1], seed=2)
    assert torch.equal(merged, merge_task_vectors_reference(torch.zeros(shape), [x], [1.0], [0.4], "rank",
                                                            epsilons=[0.1], seed=2))


def test_della_keep_probabilities_do_not_depend_on_torchs_default_dtype():
    # before, the rank divisor (ncols - 1) was a tensor of the default dtype: under a bf16 default (a caller's
    # torch.set_default_dtype, or transformers building a bf16 model in another thread) 1030 became 1032
    x = torch.randn(4, 1031, generator=torch.Generator().manual_seed(0))
    want = ops.della_keep_probability(x, 0.5, 0.1)
    with torch_default_dtype(torch.bfloat16):
        assert torch.equal(ops.della_keep_probability(x, 0.5, 0.1), want)
