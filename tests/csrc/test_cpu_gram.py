"""The C++ CPU Gram kernel (csrc/cpu/gram.cpp) against an fp64 reference of the kept rows.

The kernel sums in fp32 in its own order (BLAS blocks), so results are not bit-identical to the
reference. What must hold (kernel_checks.gram_expected states and justifies the bound): after two
accumulations onto a non-zero start, every upper-triangle entry (j >= i) is within
gamma(T + 1) (|start| + sum_t |x_ti| |x_tj|) of the exact fp64 sum of the kept rows, and every
strictly lower entry keeps the start's exact bits (random bit patterns: NaNs, infinities, signed
zeros); mirror_upper_ then makes the matrix exactly symmetric. Masked-out rows carry as much weight
as kept ones, so a kernel that read them would exceed the bound by orders of magnitude.
Sizes: d = 1, 7 and 33 (one narrow leaf), 256 (two leaves of kLeaf = 128 columns), 513 (four and a
one-column one: five leaves, split 2 + 3) and 1100 (eight and a 76-column one); 1, 5 and 4097 tokens
(4097: two chunks of kChunk = 4096 rows), and 10000 masked tokens (more than a chunk kept).
"""
import pytest
import torch

from merge_engine import ops
from merge_engine.ops import backends
from merge_engine.ops.gram import _accumulate_with, mirror_upper_
from tests.csrc.kernel_checks import (
    GRAM_MASKS,
    assert_gram,
    gram_activations,
    gram_expected,
    gram_mask,
    gram_start,
    seed_of,
)

if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ext():
    module = backends.cpu_extension()
    assert module is not None, "the CPU extension failed to build (see the warning above)"
    return module


def check_two_accumulations(ext, lead_shape, d, dtype, mask_kind, context):
    """Two batches onto a random start, checked against the fp64 reference; then mirror_upper_."""
    seed = seed_of(context)
    g = torch.Generator().manual_seed(seed)
    start = gram_start(d, g)
    gram = start.clone()
    batches = [(gram_activations((*lead_shape, d), dtype, g), gram_mask(mask_kind, lead_shape, g)) for _ in range(2)]
    for x, mask in batches:
        _accumulate_with(ext, gram, x, mask)
    want, bound = gram_expected(start, batches)
    assert_gram(gram, start, want, bound, f"seed {seed}, {context}")
    if mask_kind == "none kept":
        assert torch.equal(gram.view(torch.int32), start.view(torch.int32)), f"seed {seed}: no token kept, gram changed"
    upper = gram.triu()
    mirror_upper_(gram)
    assert torch.equal(gram, gram.T) and torch.equal(gram.triu(), upper), f"seed {seed}: mirror_upper_"


# (d, tokens, mask kind); d = 1100 with 4097 tokens (its fp64 reference takes seconds) with two masks
CASES = [(d, tokens, mask_kind) for d in (1, 7, 33, 256, 513, 1100) for tokens in (1, 5, 4097) for mask_kind in GRAM_MASKS
         if (d, tokens) != (1100, 4097) or mask_kind in (None, "random")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d, tokens, mask_kind", CASES)
def test_accumulate_within_bound(ext, d, tokens, dtype, mask_kind):
    check_two_accumulations(ext, (tokens,), d, dtype, mask_kind, ("gram", d, tokens, dtype, mask_kind))


@pytest.mark.parametrize("dtype", DTYPES)
def test_more_kept_tokens_than_a_chunk(ext, dtype):
    check_two_accumulations(ext, (10000,), 33, dtype, "random", ("chunks", dtype))


def test_the_op_routes_to_the_cpu_kernel(ext, monkeypatch):
    """ops.accumulate_gram reaches the kernel with [T, d] rows and a [T] mask, for activations with
    leading dims; an fp64 gram and a non-contiguous one stay on the reference."""
    calls = []

    class Spy:
        def accumulate_gram(self, gram, x, mask):
            calls.append((tuple(x.shape), None if mask is None else tuple(mask.shape)))
            return ext.accumulate_gram(gram, x, mask)

    monkeypatch.setattr(backends, "cpu_extension", lambda: Spy())
    g = torch.Generator().manual_seed(seed_of("route"))
    x, mask = gram_activations((3, 5, 7), torch.bfloat16, g), gram_mask("random", (3, 5), g)
    start = gram_start(7, g)
    gram = start.clone()
    ops.accumulate_gram(gram, x, mask)
    assert_gram(gram, start, *gram_expected(start, [(x, mask)]), "through the op")
    ops.accumulate_gram(torch.zeros(7, 7, dtype=torch.float64), x)
    ops.accumulate_gram(torch.zeros(7, 14)[:, ::2], x)
    assert calls == [((15, 7), (15,))]


def test_bad_arguments_are_value_errors_through_the_op():
    x = torch.ones(4, 7)
    for gram, acts, mask, message in [
        (torch.zeros(7, 6), x, None, "gram must be \\[d, d\\]"),
        (torch.zeros(7, 7, dtype=torch.float16), x, None, "gram must be float32"),
        (torch.zeros(7, 7), x.int(), None, "activations floating point"),
        (torch.zeros(7, 7), x, torch.ones(4, dtype=torch.uint8), "mask must be a bool tensor of shape \\[4\\]"),
        (torch.zeros(7, 7), x, torch.ones(5, dtype=torch.bool), "mask must be a bool tensor of shape \\[4\\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            ops.accumulate_gram(gram, acts, mask)


def test_kernel_rejects_bad_arguments(ext):
    x, gram = torch.ones(4, 7), torch.zeros(7, 7)
    for args, message in [
        ((torch.zeros(7, 7).t(), x, None), "gram must be a contiguous float32 \\[d, d\\]"),
        ((torch.zeros(7, 7, dtype=torch.float64), x, None), "gram must be a contiguous float32"),
        ((gram, x.double(), None), "float32, bfloat16 or float16 \\[T, d\\]"),
        ((gram, x.reshape(2, 2, 7), None), "\\[T, d\\] tensor"),
        ((gram, torch.ones(7, 4).t(), None), "contiguous float32, bfloat16 or float16"),
        ((gram, torch.ones(4, 6), None), "does not match activations"),
        ((gram, x, torch.ones(4, 1, dtype=torch.bool)), "mask must be a contiguous bool \\[T\\] tensor"),
        ((gram, x, torch.ones(4)), "mask must be a contiguous bool \\[T\\] tensor"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            ext.accumulate_gram(*args)
