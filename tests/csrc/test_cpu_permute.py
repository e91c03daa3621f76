"""The C++ CPU permute kernels (csrc/cpu/permute.cpp) against the PyTorch references, bit for bit.

gather and swap move bits, so their inputs are random bit patterns (NaNs with payloads, signed zeros,
subnormals, infinities) and results must have the references' exact bits. scatter-add must give the
references' exact sums: inputs span many magnitudes (subnormal to large), with signed zeros, and no
NaN (whose bits the add does not specify). Every dtype, dims 0 and 1 (and the middle dim of a 3-D
tensor), block sizes 1 and > 1, odd shapes, 1-D tensors, one to five layers, random and key-shaped
index tables, and empty ones.
"""
import pytest
import torch

from merge_engine.ops import backends
from merge_engine.ops import permute as permute_ops
from merge_engine.ops.permute import gather_blocks_reference, scatter_add_blocks_reference, swap_blocks_reference
from tests.csrc.kernel_checks import BITS, random_bits, seed_of, spread_values

if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, dim, block_size)
CASES = [((7, 13), 0, 1), ((7, 13), 1, 1), ((7, 13), 0, 7), ((7, 13), 1, 13), ((1023, 5), 0, 1), ((1023, 5), 0, 3),
         ((1023, 5), 1, 1), ((5, 1023), 1, 3), ((1,), 0, 1), ((12,), 0, 4), ((4097,), 0, 17), ((3, 8, 5), 1, 2),
         ((64, 300), 0, 8), ((300, 64), 1, 16)]
LAYERS = [1, 3, 5]


@pytest.fixture(scope="module")
def ext():
    module = backends.cpu_extension()
    assert module is not None, "the CPU extension failed to build (see the warning above)"
    return module



def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(BITS[x.element_size()])




def distinct_sources(num_layers, n_blocks, g):
    """src_layer, src_block: n_blocks distinct random blocks of the num_layers x n_blocks stack."""
    chosen = torch.randperm(num_layers * n_blocks, generator=g)[:n_blocks]
    return chosen // n_blocks, chosen % n_blocks


def assert_same_bits(got, want, context):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{context}, tensor {i}: {a.dtype} {list(a.shape)}"
        assert torch.equal(bits(a), bits(b)), f"{context}, tensor {i}: {int((bits(a) != bits(b)).sum())} differ"


@pytest.mark.parametrize("num_layers", LAYERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_gather_equals_reference(ext, case, dtype, num_layers):
    shape, dim, block_size = case
    seed = seed_of("gather", case, dtype, num_layers)
    g = torch.Generator().manual_seed(seed)
    tensors = [random_bits(shape, dtype, g) for _ in range(num_layers)]
    n_blocks = shape[dim] // block_size
    tables = [distinct_sources(num_layers, n_blocks, g),  # a permutation's tables
              (torch.randint(0, num_layers, (n_blocks,), generator=g),  # any tables: blocks read twice
               torch.randint(0, n_blocks, (n_blocks,), generator=g))]
    for layer in {0, num_layers - 1}:
        for src_layer, src_block in tables:
            got = ext.gather_blocks(tensors, layer, src_layer, src_block, dim, block_size)
            want = gather_blocks_reference(tensors, layer, src_layer, src_block, dim, block_size)
            assert_same_bits([got], [want], f"seed {seed}, layer {layer}")


@pytest.mark.parametrize("num_layers", LAYERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_scatter_add_equals_reference(ext, case, dtype, num_layers):
    shape, dim, block_size = case
    seed = seed_of("scatter", case, dtype, num_layers)
    g = torch.Generator().manual_seed(seed)
    targets = [spread_values(shape, dtype, g) for _ in range(num_layers)]
    values = spread_values(shape, dtype, g)
    src_layer, src_block = distinct_sources(num_layers, shape[dim] // block_size, g)
    got, want = [t.clone() for t in targets], [t.clone() for t in targets]
    ext.scatter_add_blocks(got, 0, values, src_layer, src_block, dim, block_size)
    scatter_add_blocks_reference(want, 0, values, src_layer, src_block, dim, block_size)
    assert_same_bits(got, want, f"seed {seed}")


@pytest.mark.parametrize("num_layers", LAYERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_swap_equals_reference(ext, case, dtype, num_layers):
    shape, dim, block_size = case
    seed = seed_of("swap", case, dtype, num_layers)
    g = torch.Generator().manual_seed(seed)
    tensors = [random_bits(shape, dtype, g) for _ in range(num_layers)]
    n_blocks = shape[dim] // block_size
    count = int(torch.randint(0, num_layers * n_blocks // 2 + 1, (), generator=g))
    chosen = torch.randperm(num_layers * n_blocks, generator=g)[:2 * count].view(2, count)
    pairs = torch.stack([chosen[0] // n_blocks, chosen[0] % n_blocks, chosen[1] // n_blocks, chosen[1] % n_blocks], 1)
    got, want = [t.clone() for t in tensors], [t.clone() for t in tensors]
    ext.swap_blocks(got, pairs, dim, block_size)
    swap_blocks_reference(want, pairs, dim, block_size)
    assert_same_bits(got, want, f"seed {seed}, {count} swaps")


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_tables(ext, dtype):
    for shape, dim in (((0, 5), 0), ((5, 0), 1), ((0,), 0)):
        tensors = [torch.empty(shape, dtype=dtype) for _ in range(2)]
        none = torch.empty(0, dtype=torch.int64)
        assert ext.gather_blocks(tensors, 1, none, none, dim, 1).shape == shape
        ext.scatter_add_blocks(tensors, 0, torch.empty(shape, dtype=dtype), none, none, dim, 1)
    tensors = [random_bits((6, 7), dtype, torch.Generator().manual_seed(1)) for _ in range(2)]
    kept = [t.clone() for t in tensors]
    ext.swap_blocks(tensors, torch.empty(0, 4, dtype=torch.int64), 1, 7)
    assert_same_bits(tensors, kept, "no swaps")
    spanless = [torch.empty(4, 0, dtype=dtype) for _ in range(2)]  # blocks of no element
    ext.swap_blocks(spanless, torch.tensor([[0, 1, 1, 2]]), 0, 1)
    assert ext.gather_blocks(spanless, 0, torch.tensor([1, 0, 1, 0]), torch.arange(4), 0, 1).shape == (4, 0)


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
