"""The permute op references (merge_engine/ops/permute.py): their properties against plain torch indexing
and each other, their gradient, and their argument checks.

Run with MERGE_ENGINE_KERNELS=0 the ops are the references themselves; otherwise kernel dtypes go to the
compiled kernels (which tests/kernels/test_permute.py holds to the references bit for bit), so these
properties hold for both. Inputs are seeded from the test parameters (tests.conftest.seed_of); every
assertion message names the seed.
"""
import pytest
import torch

from merge_engine.ops import backends, gather_blocks, scatter_add_blocks_, swap_blocks_
from merge_engine.ops.permute import gather_blocks_reference, scatter_add_blocks_reference, swap_blocks_reference
from merge_engine.tiers.permutation import BlockPermutation
from tests.conftest import DTYPES as KERNEL_DTYPES
from tests.conftest import seed_of

DTYPES = [*KERNEL_DTYPES, torch.float64]  # the kernels' dtypes, and float64 on the reference
# (shape, dim, block_size): matrix rows and columns, single and multi-index blocks, odd sizes, a bias
CASES = [((7, 13), 0, 1), ((7, 13), 1, 13), ((12, 5), 0, 3), ((5, 12), 1, 4), ((8,), 0, 2), ((3, 4, 6), 1, 2)]


def make_stack(num_layers, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(num_layers)]


def random_swaps(num_layers, n_blocks, count, seed):
    """count disjoint swaps among the num_layers x n_blocks blocks, as an int64 [count, 4] tensor."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(num_layers * n_blocks, generator=g)[:2 * count].view(2, count)
    return torch.stack([chosen[0] // n_blocks, chosen[0] % n_blocks, chosen[1] // n_blocks, chosen[1] % n_blocks], 1)


def block_slice(t, dim, block, block_size):
    index = [slice(None)] * t.dim()
    index[dim] = slice(block * block_size, (block + 1) * block_size)
    return tuple(index)


def swapped_by_indexing(tensors, pairs, dim, block_size):
    """The tensors after the swaps, done one by one with plain torch indexing on copies."""
    out = [t.clone() for t in tensors]
    for la, ba, lb, bb in pairs.tolist():
        a, b = block_slice(out[la], dim, ba, block_size), block_slice(out[lb], dim, bb, block_size)
        out[la][a], out[lb][b] = out[lb][b].clone(), out[la][a].clone()
    return out


def key_tables(pairs, num_layers, n_blocks):
    """The dense (src_layer, src_block) tables of a key made of these swaps (tiers.permutation)."""
    swaps = [((la, ba), (lb, bb)) for la, ba, lb, bb in pairs.tolist()]
    return BlockPermutation.from_swaps({"mlp_cols": swaps}).index_tables("mlp_up", num_layers, n_blocks)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_gather_with_identity_tables_is_a_copy(case, dtype):
    shape, dim, block_size = case
    seed = seed_of("identity", case, dtype)
    tensors = make_stack(3, shape, dtype, seed)
    n_blocks = shape[dim] // block_size
    for layer in range(3):
        got = gather_blocks(tensors, layer, torch.full((n_blocks,), layer), torch.arange(n_blocks), dim, block_size)
        assert torch.equal(got, tensors[layer]), f"seed {seed}, layer {layer}"
        assert got.data_ptr() != tensors[layer].data_ptr(), "gather_blocks must return a new tensor"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_gather_by_a_keys_tables_equals_swapping_the_blocks(case, dtype):
    shape, dim, block_size = case
    seed = seed_of("key", case, dtype)
    num_layers, n_blocks = 4, shape[dim] // block_size
    tensors = make_stack(num_layers, shape, dtype, seed)
    pairs = random_swaps(num_layers, n_blocks, max(1, num_layers * n_blocks // 3), seed)
    src_layer, src_block = key_tables(pairs, num_layers, n_blocks)
    keyed = swapped_by_indexing(tensors, pairs, dim, block_size)
    for layer in range(num_layers):
        got = gather_blocks(tensors, layer, src_layer[layer], src_block[layer], dim, block_size)
        assert torch.equal(got, keyed[layer]), f"seed {seed}, layer {layer}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_swap_equals_indexing_and_twice_is_identity(case, dtype):
    shape, dim, block_size = case
    seed = seed_of("swap", case, dtype)
    num_layers, n_blocks = 3, shape[dim] // block_size
    original = make_stack(num_layers, shape, dtype, seed)
    pairs = random_swaps(num_layers, n_blocks, num_layers * n_blocks // 2, seed)
    tensors = [t.clone() for t in original]
    swap_blocks_(tensors, pairs, dim, block_size)
    want = swapped_by_indexing(original, pairs, dim, block_size)
    assert all(torch.equal(t, w) for t, w in zip(tensors, want)), f"seed {seed}"
    swap_blocks_(tensors, pairs.flip(0), dim, block_size)  # any order of disjoint swaps
    assert all(torch.equal(t, o) for t, o in zip(tensors, original)), f"seed {seed}"


@pytest.mark.parametrize("case", CASES)
def test_scatter_add_is_the_adjoint_of_gather(case):
    """<gather(x), y> == sum_l <x_l, scatter(y)_l>, exactly: integer values, fp64 sums."""
    shape, dim, block_size = case
    seed = seed_of("adjoint", case)
    g = torch.Generator().manual_seed(seed)
    num_layers, n_blocks = 3, shape[dim] // block_size
    x = [torch.randint(-50, 50, shape, generator=g).double() for _ in range(num_layers)]
    y = torch.randint(-50, 50, shape, generator=g).double()
    chosen = torch.randperm(num_layers * n_blocks, generator=g)[:n_blocks]  # distinct sources
    src_layer, src_block = chosen // n_blocks, chosen % n_blocks
    left = (gather_blocks(x, 1, src_layer, src_block, dim, block_size) * y).sum()
    scattered = [torch.zeros(shape, dtype=torch.float64) for _ in range(num_layers)]
    scatter_add_blocks_(scattered, 1, y, src_layer, src_block, dim, block_size)
    right = sum((xl * sl).sum() for xl, sl in zip(x, scattered))
    assert left == right, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scatter_add_rounds_the_exact_sum_once(dtype):
    """Each element gets one add, correctly rounded to the dtype (the fp64 sum of two such values is
    exact; rounding it to the dtype is the spec)."""
    seed = seed_of("rounding", dtype)
    g = torch.Generator().manual_seed(seed)
    shape = (6, 40)
    targets = [(torch.randn(shape, generator=g) * 2.0 ** torch.randint(-12, 12, shape, generator=g)).to(dtype)
               for _ in range(2)]
    values = (torch.randn(shape, generator=g) * 2.0 ** torch.randint(-12, 12, shape, generator=g)).to(dtype)
    src_layer, src_block = torch.tensor([1, 0, 0]), torch.tensor([2, 0, 1])
    want = [t.double() for t in targets]
    for b, (layer, block) in enumerate(zip(src_layer.tolist(), src_block.tolist())):
        want[layer][2 * block:2 * block + 2] += values[2 * b:2 * b + 2].double()
    scatter_add_blocks_(targets, 0, values, src_layer, src_block, 0, 2)
    assert all(torch.equal(t, w.to(dtype)) for t, w in zip(targets, want)), f"seed {seed}"


@pytest.mark.parametrize("case", CASES)
def test_gradcheck(case):
    shape, dim, block_size = case
    seed = seed_of("gradcheck", case)
    num_layers, n_blocks = 3, shape[dim] // block_size
    tensors = [t.requires_grad_() for t in make_stack(num_layers, shape, torch.float64, seed)]
    g = torch.Generator().manual_seed(seed)
    src_layer = torch.randint(0, num_layers, (n_blocks,), generator=g)
    src_block = torch.randint(0, n_blocks, (n_blocks,), generator=g)  # repeats: gradients add up

    def gather(*ts):
        return gather_blocks(list(ts), 2, src_layer, src_block, dim, block_size)
    assert torch.autograd.gradcheck(gather, tuple(tensors)), f"seed {seed}"


def test_tensors_no_block_comes_from_get_no_gradient():
    tensors = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    out = gather_blocks(tensors, 1, torch.tensor([0, 0, 2]), torch.tensor([2, 0, 1]), 1, 2)
    (out * torch.arange(24.0).view(4, 6)).sum().backward()
    assert tensors[1].grad is None
    weights = torch.arange(24.0).view(4, 6)
    assert torch.equal(tensors[0].grad[:, 4:6], weights[:, 0:2])
    assert torch.equal(tensors[0].grad[:, 0:2], weights[:, 2:4])
    assert torch.equal(tensors[0].grad[:, 2:4], torch.zeros(4, 2))
    assert torch.equal(tensors[2].grad[:, 2:4], weights[:, 4:6])


def test_gradient_under_torch_compile():
    """A compiled function differentiates through gather_blocks (AOTAutograd traces the backward before the
    tables are known): the eager gradients, and zeros for the tensors no block came from (None in eager)."""
    tensors = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    weights = torch.arange(24.0).view(4, 6)

    def loss(tensors, src_layer, src_block):
        return (gather_blocks(tensors, 1, src_layer, src_block, 1, 2) * weights).sum()
    tables = torch.tensor([0, 0, 2]), torch.tensor([2, 0, 0])  # block 0 of layer 0 read twice
    loss(tensors, *tables).backward()
    eager = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    torch._dynamo.reset()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(tensors, *tables).backward()
    assert torch.equal(tensors[0].grad, eager[0]) and torch.equal(tensors[2].grad, eager[2])
    assert eager[1] is None and torch.equal(tensors[1].grad, torch.zeros(4, 6))


@pytest.mark.parametrize("kernels", ["compiled", "reference"])
def test_gradient_with_create_graph_is_the_first_order_one_on_every_backend(kernels, monkeypatch):
    """A backward with create_graph=True (a gradient penalty's) gets the same gradients: the backward's scatter adds
    a gradient that requires grad without recording a graph of it, as the compiled kernels always did."""
    if kernels == "reference":
        monkeypatch.setattr(backends, "cpu_extension", lambda: None)
    tensors = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]

    def loss():
        return (gather_blocks(tensors, 1, torch.tensor([0, 0, 2]), torch.tensor([2, 0, 0]), 1, 2) ** 2).sum()
    want = torch.autograd.grad(loss(), [tensors[0], tensors[2]])
    got = torch.autograd.grad(loss(), [tensors[0], tensors[2]], create_graph=True)
    assert all(torch.equal(g, w) and not g.requires_grad for g, w in zip(got, want))


def test_opcheck():
    """Schemas, fake kernels and autograd registration (torch.library.opcheck). gather_blocks' backward
    reads the tables (which layers get a gradient, how often a block is read), so AOT tracing of it
    is not among its checks."""
    tensors = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    tables = (torch.tensor([0, 2, 0]), torch.tensor([1, 1, 0]))
    torch.library.opcheck(gather_blocks.functional, (tensors, 1, *tables, 1, 2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    targets = [t.detach().clone() for t in tensors]
    torch.library.opcheck(scatter_add_blocks_.functional, (targets, 1, torch.randn(4, 6), *tables, 1, 2))
    torch.library.opcheck(swap_blocks_.functional, (targets, torch.tensor([[0, 0, 2, 1]]), 1, 2))


def test_non_contiguous_tensors():
    base = [torch.randn(6, 8) for _ in range(2)]
    transposed = [t.t() for t in base]  # [8, 6], columns of base are rows here
    src_layer, src_block = torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1, 2, 3])
    got = gather_blocks(transposed, 0, src_layer, src_block, 0, 2)
    assert got.is_contiguous() and torch.equal(got.t(), gather_blocks(base, 0, src_layer, src_block, 1, 2))
    want = swapped_by_indexing(base, torch.tensor([[0, 1, 1, 2]]), 1, 2)
    swap_blocks_(transposed, torch.tensor([[0, 1, 1, 2]]), 0, 2)
    assert all(torch.equal(t.t(), w) for t, w in zip(transposed, want))


def test_empty_tables():
    tensors = [torch.empty(0, 5) for _ in range(2)]
    none = torch.empty(0, dtype=torch.int64)
    assert gather_blocks(tensors, 1, none, none, 0, 1).shape == (0, 5)
    scatter_add_blocks_(tensors, 0, torch.empty(0, 5), none, none, 0, 1)
    full = [torch.randn(4, 5) for _ in range(2)]
    kept = [t.clone() for t in full]
    swap_blocks_(full, torch.empty(0, 4, dtype=torch.int64), 1, 5)
    assert all(torch.equal(t, k) for t, k in zip(full, kept))


# ---- argument checks ----

def gather_args(**change):
    args = dict(tensors=[torch.zeros(4, 6) for _ in range(3)], layer=1, src_layer=torch.tensor([0, 1, 2]),
                src_block=torch.tensor([2, 1, 0]), dim=1, block_size=2)
    args.update(change)
    return args


BAD_GATHER = {
    "no tensors": (dict(tensors=[]), "at least one tensor"),
    "shapes differ": (dict(tensors=[torch.zeros(4, 6), torch.zeros(6, 4), torch.zeros(4, 6)]), "all must match"),
    "dtypes differ": (dict(tensors=[torch.zeros(4, 6), torch.zeros(4, 6).half(), torch.zeros(4, 6)]),
                      "all must match"),
    "dim": (dict(dim=2), "dim 2 is out of range"),
    "negative dim": (dict(dim=-1), "out of range"),
    "block size does not divide": (dict(block_size=4), "must be >= 1 and divide the size 6"),
    "block size 0": (dict(block_size=0), "must be >= 1"),
    "layer": (dict(layer=3), "layer 3 is out of range"),
    "table length": (dict(src_layer=torch.tensor([0, 1])), "src_layer must be an int64 tensor of shape \\[3\\]"),
    "table dtype": (dict(src_block=torch.tensor([2, 1, 0], dtype=torch.int32)), "src_block must be an int64"),
    "layer range": (dict(src_layer=torch.tensor([0, 3, 2])), "src_layer has entries outside \\[0, 3\\)"),
    "block range": (dict(src_block=torch.tensor([2, -1, 0])), "src_block has entries outside \\[0, 3\\)"),
}


@pytest.mark.parametrize("name", BAD_GATHER)
def test_gather_rejects_bad_arguments(name):
    change, message = BAD_GATHER[name]
    with pytest.raises(ValueError, match=message):
        gather_blocks(**gather_args(**change))
    with pytest.raises(ValueError, match=message):
        gather_blocks_reference(**gather_args(**change))


def test_tables_on_another_device_are_rejected():
    # the reference only: through the op, a meta tensor argument dispatches to the op's fake kernel
    with pytest.raises(ValueError, match="src_block must be an int64 tensor of shape \\[3\\] on cpu"):
        gather_blocks_reference(**gather_args(src_block=torch.tensor([2, 1, 0], device="meta")))


def test_scatter_rejects_bad_arguments():
    args = gather_args()
    targets, tables = args.pop("tensors"), (args["src_layer"], args["src_block"])
    with pytest.raises(ValueError, match="values is torch.float16"):
        scatter_add_blocks_(targets, 1, torch.zeros(4, 6).half(), *tables, 1, 2)
    with pytest.raises(ValueError, match="values is torch.float32 \\[6, 4\\]"):
        scatter_add_blocks_(targets, 1, torch.zeros(6, 4), *tables, 1, 2)
    with pytest.raises(ValueError, match="appears more than once"):
        scatter_add_blocks_(targets, 1, torch.zeros(4, 6), torch.tensor([0, 2, 0]), torch.tensor([1, 1, 1]), 1, 2)
    with pytest.raises(ValueError, match="src_block has entries outside"):
        scatter_add_blocks_reference(targets, 1, torch.zeros(4, 6), tables[0], torch.tensor([0, 1, 5]), 1, 2)
    assert all(torch.equal(t, torch.zeros(4, 6)) for t in targets), "a rejected call must change nothing"


@pytest.mark.parametrize("pairs, message", [
    (torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]]), "more than one place"),
    (torch.tensor([[0, 1, 0, 1]]), "more than one place"),
    (torch.tensor([[0, 1, 3, 1]]), "layer columns 0 and 2"),
    (torch.tensor([[0, 3, 1, 1]]), "block columns 1 and 3"),
    (torch.tensor([[0, 1, 1]]), "pairs must be an int64 tensor of shape \\['M', 4\\]"),
    (torch.tensor([0, 1, 1, 1]), "pairs must be"),
    (torch.tensor([[0, 1, 1, 1]], dtype=torch.int32), "pairs must be"),
])
def test_swap_rejects_bad_arguments(pairs, message):
    tensors = [torch.randn(4, 6) for _ in range(3)]
    kept = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match=message):
        swap_blocks_(tensors, pairs, 1, 2)
    with pytest.raises(ValueError, match=message):
        swap_blocks_reference(tensors, pairs, 1, 2)
    assert all(torch.equal(t, k) for t, k in zip(tensors, kept)), "a rejected call must change nothing"
