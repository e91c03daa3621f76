"""The C++ CPU permute kernels (csrc/cpu/permute.cpp): many threads' worth of work, the gradient through
them, their memory guards and how the ops reach them. Their values, bit for bit against the
references (every dtype, dims 0 and 1 and the middle dim of a 3-D tensor, block sizes 1 and > 1, odd
shapes, 1-D tensors, one to five layers, permutation and repeating tables, empty ones), are tested
with the other backends' in tests/kernels/test_permute.py.
"""
import pytest
import torch

from merge_engine.ops import backends
from merge_engine.ops import permute as permute_ops
from merge_engine.ops.permute import gather_blocks_reference
from tests.conftest import seed_of
from tests.csrc.kernel_checks import random_bits, spread_values
from tests.kernels.test_permute import assert_same_bits, distinct_sources

if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

pytestmark = pytest.mark.cpu_kernels


def test_large_tables_and_layers(ext):
    """A bf16 MLP-like stack, 8 layers: many threads' worth of items, rows and columns."""
    seed = seed_of("large")
    g = torch.Generator().manual_seed(seed)
    for shape, dim in (((688, 256), 0), ((256, 688), 1)):
        tensors = [random_bits(shape, torch.bfloat16, g) for _ in range(8)]
        src_layer, src_block = distinct_sources(8, 688, g)
        got = ext.gather_blocks(tensors, 3, src_layer, src_block, dim, 1)
        assert_same_bits([got], [gather_blocks_reference(tensors, 3, src_layer, src_block, dim, 1)], f"seed {seed}")


def test_gradient_through_the_kernels(ext):
    """gather_blocks' backward (one scatter per repeated read) on the kernels, against the reference."""
    seed = seed_of("backward")
    g = torch.Generator().manual_seed(seed)
    tensors = [spread_values((6, 40), torch.bfloat16, g).requires_grad_() for _ in range(4)]
    src_layer, src_block = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 20, (20,), generator=g)
    grad_out = spread_values((6, 40), torch.bfloat16, g)
    permute_ops.gather_blocks(tensors, 1, src_layer, src_block, 1, 2).backward(grad_out)
    want = [torch.zeros(6, 40, dtype=torch.bfloat16) for _ in range(4)]
    blocked = grad_out.unflatten(1, (20, 2))
    for b, (layer, block) in enumerate(zip(src_layer.tolist(), src_block.tolist())):  # reads in order
        want[layer][:, 2 * block:2 * block + 2] += blocked[:, b]
    for layer, t in enumerate(tensors):
        if layer in src_layer.tolist():
            assert_same_bits([t.grad], [want[layer]], f"seed {seed}, layer {layer}")
        else:
            assert t.grad is None, f"layer {layer} is no source"


def test_kernels_guard_memory(ext):
    """Indices are validated in Python; the kernels still refuse out-of-range ones rather than read past."""
    tensors = [torch.zeros(4, 6) for _ in range(2)]
    with pytest.raises(RuntimeError, match="out of range"):
        ext.gather_blocks(tensors, 0, torch.tensor([0, 2, 0]), torch.tensor([0, 1, 2]), 1, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        ext.swap_blocks(tensors, torch.tensor([[0, 0, 1, 3]]), 1, 2)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.gather_blocks([t.double() for t in tensors], 0, torch.zeros(3, dtype=torch.int64),
                          torch.arange(3), 1, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.swap_blocks([t.t() for t in tensors], torch.tensor([[0, 0, 1, 1]]), 0, 2)


def test_the_ops_route_to_the_cpu_kernels(ext, monkeypatch):
    calls = []

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(ext, name)(*args)
            return call

    monkeypatch.setattr(backends, "cpu_extension", lambda: Spy())
    tensors = [torch.randn(4, 6).to(torch.bfloat16) for _ in range(2)]
    src_layer, src_block = torch.tensor([1, 0, 1]), torch.tensor([0, 1, 2])
    got = permute_ops.gather_blocks(tensors, 0, src_layer, src_block, 1, 2)
    assert torch.equal(got, gather_blocks_reference(tensors, 0, src_layer, src_block, 1, 2))
    permute_ops.scatter_add_blocks_(tensors, 0, got, src_layer, src_block, 1, 2)
    permute_ops.swap_blocks_(tensors, torch.tensor([[0, 0, 1, 1]]), 1, 2)
    columns = torch.tensor([[1, 0], [0, 1], [1, 2]])  # tables as non-contiguous columns of a table
    assert torch.equal(permute_ops.gather_blocks(tensors, 0, columns[:, 0], columns[:, 1], 1, 2),
                       gather_blocks_reference(tensors, 0, columns[:, 0], columns[:, 1], 1, 2))
    # the reference serves float64 and non-contiguous tensors
    permute_ops.gather_blocks([t.double() for t in tensors], 0, src_layer, src_block, 1, 2)
    permute_ops.swap_blocks_([t.t() for t in tensors], torch.tensor([[0, 0, 1, 1]]), 0, 2)
    assert calls == ["gather_blocks", "scatter_add_blocks", "swap_blocks", "gather_blocks"]
    with pytest.raises(ValueError, match="appears more than once"):  # checked before any kernel runs
        permute_ops.scatter_add_blocks_(tensors, 0, got, torch.tensor([1, 1, 1]), torch.tensor([0, 0, 2]), 1, 2)
    assert len(calls) == 4
