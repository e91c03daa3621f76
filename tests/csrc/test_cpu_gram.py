"""The C++ CPU Gram kernel (csrc/cpu/gram.cpp): how the op reaches it, and its argument checks. Its
values, against an fp64 reference of the kept rows at its leaf and chunk thresholds, are tested with
the other backends' in tests/kernels/test_gram.py.
"""
import pytest
import torch

from merge_engine import ops
from merge_engine.ops import backends
from tests.conftest import seed_of
from tests.csrc.kernel_checks import assert_gram, gram_activations, gram_expected, gram_mask, gram_start

if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

pytestmark = pytest.mark.cpu_kernels


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
