"""The permute kernels of every backend (C++ CPU csrc/cpu/permute.cpp, CUDA csrc/cuda/permute.cu, Triton
triton_kernels/permute.py) against the PyTorch references (merge_engine/ops/permute.py), run on CPU
copies, bit for bit.

gather and swap move bits, so their inputs are random bit patterns (NaNs with payloads, signed zeros,
subnormals, infinities) and results must have the references' exact bits. scatter-add must give the
references' exact sums (one fp32 add rounded once to the dtype): inputs span many magnitudes
(subnormal to large), with signed zeros, and no NaN (whose bits the add does not specify).

Cases per backend, (shape, dim, block_size): dims 0 and 1 (and the middle dim of a 3-D tensor), block
sizes 1 (one-element runs: the C++ kernel copies them without memcpy) and > 1, odd shapes, 1-D
tensors; for CUDA 16-byte, narrower and one-element units and more outer rows than one grid
dimension holds; for Triton (the interpreter is slow) small shapes that still span rows of several
1024-element programs. Over a pairwise covering set of (case, dtype, layer count, alignment): gather
reads permutation tables into the first layer and tables that read blocks twice into the last;
scatter-add adds into the last; swap swaps some and then all blocks. Misaligned: the tensors start one element past their allocation (units narrower
than 16 bytes on the GPU).
"""
import torch

from merge_engine.ops.permute import gather_blocks_reference, scatter_add_blocks_reference, swap_blocks_reference
from tests.conftest import DTYPES, pairwise, seed_of
from tests.csrc.kernel_checks import BITS, random_bits, spread_values
from tests.kernels.conftest import on, per_backend

FAMILY = "permute"

CPU_CASES = [((7, 13), 0, 1), ((7, 13), 1, 1), ((7, 13), 0, 7), ((7, 13), 1, 13), ((1023, 5), 0, 1),
             ((1023, 5), 0, 3), ((1023, 5), 1, 1), ((5, 1023), 1, 3), ((1,), 0, 1), ((12,), 0, 4), ((4097,), 0, 17),
             ((3, 8, 5), 1, 2), ((64, 300), 0, 8), ((300, 64), 1, 16)]
CUDA_CASES = [((7, 13), 0, 1), ((7, 13), 1, 13), ((1023, 5), 0, 3), ((1023, 5), 1, 1), ((4097,), 0, 17),
              ((3, 8, 5), 1, 2), ((688, 256), 0, 1), ((256, 688), 1, 1), ((64, 512), 1, 128),
              ((70_000, 3), 1, 1)]  # the last: more outer rows than gridDim.y (grid-stride loop)
TRITON_CASES = [((7, 13), 0, 1), ((7, 13), 1, 13), ((9, 300), 0, 3), ((5, 2100), 1, 1), ((30, 70), 1, 7),
                ((2500,), 0, 5), ((3, 8, 5), 1, 2)]
ALIGNED = [True, False]
CASES = {"cpu": pairwise(CPU_CASES, DTYPES, [1, 3, 5], ALIGNED),
         "cuda": pairwise(CUDA_CASES, DTYPES, [4], ALIGNED),
         "triton": pairwise(TRITON_CASES, DTYPES, [3], ALIGNED)}


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.cpu().view(BITS[x.element_size()])


def assert_same_bits(got, want, context):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{context}, tensor {i}: {a.dtype} {list(a.shape)}"
        differ = bits(a) != bits(b)
        assert not differ.any(), f"{context}, tensor {i}: {int(differ.sum())} of {b.numel()} elements differ"


def placer(backend, aligned):
    """Copies of CPU tensors on the backend's device: as allocated, or starting one element past their
    allocation (contiguous views whose data pointer is not 16-byte aligned)."""
    def misaligned(t):
        storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=backend.device)
        return storage[1:].view(t.shape).copy_(t)
    return (lambda ts: [t.to(backend.device) for t in ts]) if aligned else (lambda ts: [misaligned(t) for t in ts])


def start(op, backend, case, dtype, num_layers, aligned):
    """A test's case, its seed, a generator seeded with it, and its placer."""
    seed = seed_of(op, case, dtype, num_layers, aligned)
    return case, seed, torch.Generator().manual_seed(seed), placer(backend, aligned)


def distinct_sources(num_layers, n_blocks, g):
    """src_layer, src_block: n_blocks distinct random blocks of the num_layers x n_blocks stack."""
    chosen = torch.randperm(num_layers * n_blocks, generator=g)[:n_blocks]
    return chosen // n_blocks, chosen % n_blocks


@per_backend("case, dtype, num_layers, aligned", CASES)
def test_gather_matches_reference_exactly(backend, case, dtype, num_layers, aligned):
    (shape, dim, block_size), seed, g, put = start("gather", backend, case, dtype, num_layers, aligned)
    tensors = [random_bits(shape, dtype, g) for _ in range(num_layers)]
    n_blocks = shape[dim] // block_size
    tables = [distinct_sources(num_layers, n_blocks, g),  # a permutation's tables
              (torch.randint(0, num_layers, (n_blocks,), generator=g),  # any tables: blocks read twice
               torch.randint(0, n_blocks, (n_blocks,), generator=g))]
    for layer, (src_layer, src_block) in zip((0, num_layers - 1), tables):
        got = backend.module.gather_blocks(put(tensors), layer, *backend.put([src_layer, src_block]), dim, block_size)
        assert got.device.type == backend.device
        want = gather_blocks_reference(tensors, layer, src_layer, src_block, dim, block_size)
        assert_same_bits([got], [want], f"seed {seed}, layer {layer}")


@per_backend("case, dtype, num_layers, aligned", CASES)
def test_scatter_add_matches_reference_exactly(backend, case, dtype, num_layers, aligned):
    (shape, dim, block_size), seed, g, put = start("scatter", backend, case, dtype, num_layers, aligned)
    layer = num_layers - 1  # the first for one layer
    targets = [spread_values(shape, dtype, g) for _ in range(num_layers)]
    values = spread_values(shape, dtype, g)
    src_layer, src_block = distinct_sources(num_layers, shape[dim] // block_size, g)
    got = put(targets)
    backend.module.scatter_add_blocks(got, layer, *put([values]), *backend.put([src_layer, src_block]), dim,
                                      block_size)
    scatter_add_blocks_reference(targets, layer, values, src_layer, src_block, dim, block_size)
    assert_same_bits(got, targets, f"seed {seed}")


@per_backend("case, dtype, num_layers, aligned", CASES)
def test_swap_matches_reference_exactly(backend, case, dtype, num_layers, aligned):
    (shape, dim, block_size), seed, g, put = start("swap", backend, case, dtype, num_layers, aligned)
    n_blocks = shape[dim] // block_size
    most = num_layers * n_blocks // 2  # every block in a swap (but one, for an odd count)
    for count in (int(torch.randint(0, most + 1, (), generator=g)), most):
        tensors = [random_bits(shape, dtype, g) for _ in range(num_layers)]
        chosen = torch.randperm(num_layers * n_blocks, generator=g)[:2 * count].view(2, count)
        pairs = torch.stack([chosen[0] // n_blocks, chosen[0] % n_blocks, chosen[1] // n_blocks,
                             chosen[1] % n_blocks], 1)
        got = put(tensors)
        backend.module.swap_blocks(got, backend.put(pairs), dim, block_size)
        swap_blocks_reference(tensors, pairs, dim, block_size)
        assert_same_bits(got, tensors, f"seed {seed}, {count} swaps")


@per_backend("dtype", {name: [(dtype,) for dtype in DTYPES] for name in CASES})
def test_empty_tables(backend, dtype):
    none = torch.empty(0, dtype=torch.int64, device=backend.device)
    for shape, dim in (((0, 5), 0), ((5, 0), 1), ((0,), 0)):
        tensors = [torch.empty(shape, dtype=dtype, device=backend.device) for _ in range(2)]
        assert backend.module.gather_blocks(tensors, 1, none, none, dim, 1).shape == shape
        backend.module.scatter_add_blocks(tensors, 0, torch.empty(shape, dtype=dtype, device=backend.device), none,
                                          none, dim, 1)
    tensors = [random_bits((6, 7), dtype, torch.Generator().manual_seed(1)) for _ in range(2)]
    kept = [t.clone() for t in tensors]
    on_device = backend.put(tensors)
    backend.module.swap_blocks(on_device, none.view(0, 4), 1, 7)
    assert_same_bits(on_device, kept, "no swaps")


@on("cpu", "cuda")
def test_blocks_of_no_element(backend):
    spanless = [torch.empty(4, 0, device=backend.device) for _ in range(2)]
    backend.module.swap_blocks(spanless, torch.tensor([[0, 1, 1, 2]], device=backend.device), 0, 1)
    tables = backend.put([torch.tensor([1, 0, 1, 0]), torch.arange(4)])
    assert backend.module.gather_blocks(spanless, 0, *tables, 0, 1).shape == (4, 0)
