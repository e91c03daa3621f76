"""Magnitude cut-offs: the (key, index) pair reproduces the stable order's first `count` elements.
Each property is checked on the reference and on the op (on CPU tensors, the C++ radix select when
the extension is built)."""
import pytest
import torch

from merge_engine.ops.select import (
    NOTHING_LARGEST,
    cutoff_mask,
    magnitude_cutoff,
    magnitude_cutoff_reference,
    magnitude_keys,
)
from tests.conftest import DTYPES, pairwise

CUTOFFS = pytest.mark.parametrize("cutoff", [magnitude_cutoff_reference, magnitude_cutoff], ids=["reference", "op"])


def first_in_stable_order(x, count, largest):
    order = torch.argsort(x.abs().double().reshape(-1), descending=largest, stable=True)
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:count]] = True
    return mask.reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_keys_order_like_magnitudes(dtype):
    x = torch.tensor([0.0, -0.0, 1e-3, -2.0, 2.0, float("inf"), 5e-8], dtype=torch.float32).to(dtype)
    keys = magnitude_keys(x)
    mags = x.abs().double()
    for i in range(len(x)):
        for j in range(len(x)):
            assert (keys[i] < keys[j]) == (mags[i] < mags[j])


# the reference and the op, each on every size and dtype and in both directions: a pairwise covering set
@pytest.mark.parametrize("cutoff, dtype, largest, n", pairwise(
    [magnitude_cutoff_reference, magnitude_cutoff], DTYPES, [True, False], [1, 7, 100, 1023]))
def test_cutoff_matches_stable_sort(cutoff, dtype, largest, n):
    g = torch.Generator().manual_seed(n)
    # few distinct magnitudes, both signs, zeros: many ties everywhere
    x = (torch.randint(-4, 5, (n,), generator=g).float() * 0.25).to(dtype)
    for count in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        cut = cutoff(x, count, largest)
        mask = cutoff_mask(x, cut, largest)
        assert int(mask.sum()) == count
        assert torch.equal(mask, first_in_stable_order(x, count, largest))


@CUTOFFS
def test_nothing_and_everything_sentinels(cutoff):
    x = torch.randn(5)
    assert cutoff(x, 0, True).tolist() == [NOTHING_LARGEST, 0]
    assert cutoff(x, 0, False).tolist() == [-1, 0]
    assert cutoff(x, 5, True).tolist() == [-1, 0]
    assert cutoff(x, 5, False).tolist() == [NOTHING_LARGEST, 0]


@CUTOFFS
def test_nan_is_an_error(cutoff):
    x = torch.randn(10)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="has 1 NaN value"):
        cutoff(x, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("largest", [True, False])
@CUTOFFS
def test_infinities_are_the_largest_magnitudes(cutoff, dtype, largest):
    # a merge's delta can overflow to +-Inf from finite inputs; they order above every finite magnitude
    x = torch.randn(50, generator=torch.Generator().manual_seed(7)).to(dtype)
    x[[4, 30]] = float("inf")
    x[11] = -float("inf")
    for count in (1, 2, 3, 4, 25, 47, 48):
        got = cutoff_mask(x, cutoff(x, count, largest), largest)
        assert torch.equal(got, first_in_stable_order(x, count, largest)), f"count {count}"


def test_the_op_has_a_gpu_kernel_on_the_gpu_backends_select(monkeypatch):
    """On a GPU the reference's argsort stops past 2**31 - 1 elements (a GPU sorts at most that many values in one
    dimension; a fused MoE tensor has more): CUDA tensors go to the GPU backend's select. Its kernel runs here on the
    CPU with the CPU extension standing in for the GPU backend (the same delta_cutoffs), against the reference."""
    from merge_engine.ops import backends, select
    assert torch._C._dispatch_has_kernel_for_dispatch_key("merge_engine::magnitude_cutoff", "CUDA")
    monkeypatch.setattr(backends, "gpu_backend", lambda family="task_vectors": backends.cpu_extension())
    g = torch.Generator().manual_seed(17)
    x = (torch.randint(-4, 5, (1000,), generator=g).float() * 0.25).bfloat16()
    for largest in (True, False):
        for count in (0, 1, 333, 999, 1000):
            want = magnitude_cutoff_reference(x, count, largest)
            assert torch.equal(select._magnitude_cutoff_cuda(x, count, largest), want), (largest, count)
    with pytest.raises(ValueError, match="input has 1 NaN"):
        select._magnitude_cutoff_cuda(torch.tensor([1.0, float("nan")]), 1)
