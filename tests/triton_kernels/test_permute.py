"""The Triton permute kernels (triton_kernels/permute.py) against the PyTorch references: through the
Triton interpreter on CPU tensors (TRITON_INTERPRET=1, as tools/test.sh sets), or on a GPU.

gather and swap move bits: on random bit patterns (NaN payloads, signed zeros, subnormals, infinities)
the results must have the references' exact bits. scatter-add must give the references' exact sums
(one fp32 add rounded once to the dtype) on values from subnormal to large, signed zeros included.
The interpreter is slow: shapes stay small, but span rows of several 1024-element programs.

The GPU lowering is checked without a GPU too: the kernels are compiled for sm_80 and sm_90, for each
dtype; scatter-add's PTX must add with round-to-nearest (.rn) and never flush subnormals (.ftz), and
gather and swap must do no floating-point arithmetic at all.

Inputs are seeded from the test parameters (zlib.crc32 of their repr, stable across runs); every
assertion message names the seed.
"""
import os
import re

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from merge_engine.ops import backends  # noqa: E402
from merge_engine.ops.permute import (  # noqa: E402
    _gather_with,
    _scatter_add_with,
    _swap_with,
    gather_blocks_reference,
    scatter_add_blocks_reference,
    swap_blocks_reference,
)
from merge_engine.triton_kernels import permute as tp  # noqa: E402
from tests.triton_kernels.gpu_lowering import ptx_float_ops  # noqa: E402
from tests.csrc.kernel_checks import BITS, random_bits, seed_of, spread_values  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, dim, block_size): rows and columns, one-element and longer blocks, odd sizes, 1-D, 3-D
CASES = [((7, 13), 0, 1), ((7, 13), 1, 13), ((9, 300), 0, 3), ((5, 2100), 1, 1), ((30, 70), 1, 7), ((2500,), 0, 5),
         ((3, 8, 5), 1, 2)]



def bits(x: torch.Tensor) -> torch.Tensor:
    return x.cpu().view(BITS[x.element_size()])




def on_device(tensors):
    return [t.to(DEVICE) for t in tensors]


def assert_same_bits(got, want, context):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{context}, tensor {i}: {a.dtype} {list(a.shape)}"
        assert torch.equal(bits(a), bits(b)), f"{context}, tensor {i}: {int((bits(a) != bits(b)).sum())} differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_gather_matches_reference_exactly(case, dtype):
    shape, dim, block_size = case
    seed = seed_of("gather", case, dtype)
    g = torch.Generator().manual_seed(seed)
    tensors = [random_bits(shape, dtype, g) for _ in range(3)]
    n_blocks = shape[dim] // block_size
    src_layer = torch.randint(0, 3, (n_blocks,), generator=g)
    src_block = torch.randint(0, n_blocks, (n_blocks,), generator=g)  # blocks may be read twice
    got = _gather_with(tp, on_device(tensors), 1, src_layer.to(DEVICE), src_block.to(DEVICE), dim, block_size)
    assert got.device.type == DEVICE
    want = gather_blocks_reference(tensors, 1, src_layer, src_block, dim, block_size)
    assert_same_bits([got], [want], f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_scatter_add_matches_reference_exactly(case, dtype):
    shape, dim, block_size = case
    seed = seed_of("scatter", case, dtype)
    g = torch.Generator().manual_seed(seed)
    targets = [spread_values(shape, dtype, g) for _ in range(3)]
    values = spread_values(shape, dtype, g)
    n_blocks = shape[dim] // block_size
    chosen = torch.randperm(3 * n_blocks, generator=g)[:n_blocks]
    src_layer, src_block = chosen // n_blocks, chosen % n_blocks
    got = on_device(targets)
    _scatter_add_with(tp, got, 0, values.to(DEVICE), src_layer.to(DEVICE), src_block.to(DEVICE), dim, block_size)
    scatter_add_blocks_reference(targets, 0, values, src_layer, src_block, dim, block_size)
    assert_same_bits(got, targets, f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_swap_matches_reference_exactly(case, dtype):
    shape, dim, block_size = case
    seed = seed_of("swap", case, dtype)
    g = torch.Generator().manual_seed(seed)
    tensors = [random_bits(shape, dtype, g) for _ in range(3)]
    n_blocks = shape[dim] // block_size
    count = 3 * n_blocks // 2
    chosen = torch.randperm(3 * n_blocks, generator=g)[:2 * count].view(2, count)
    pairs = torch.stack([chosen[0] // n_blocks, chosen[0] % n_blocks, chosen[1] // n_blocks, chosen[1] % n_blocks], 1)
    got = on_device(tensors)
    _swap_with(tp, got, pairs.to(DEVICE), dim, block_size)
    swap_blocks_reference(tensors, pairs, dim, block_size)
    assert_same_bits(got, tensors, f"seed {seed}, {count} swaps")


def test_empty_tables():
    none = torch.empty(0, dtype=torch.int64, device=DEVICE)
    empty = [torch.empty(0, 5, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
    assert tp.gather_blocks(empty, 1, none, none, 0, 1).shape == (0, 5)
    tp.scatter_add_blocks(empty, 0, empty[0], none, none, 0, 1)
    tensors = [torch.randn(4, 6, device=DEVICE) for _ in range(2)]
    kept = [t.clone() for t in tensors]
    tp.swap_blocks(tensors, none.view(0, 4), 1, 2)
    assert_same_bits(tensors, kept, "no swaps")


def test_unsupported_inputs_are_rejected():
    x = torch.ones(4, 6, device=DEVICE)
    tables = (torch.zeros(3, dtype=torch.int64, device=DEVICE), torch.arange(3, device=DEVICE))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tp.gather_blocks([x.double()], 0, *tables, 1, 2)
    with pytest.raises(ValueError, match="contiguous tensors"):
        tp.swap_blocks([x, torch.ones(6, 4, device=DEVICE).t()], torch.zeros(0, 4, dtype=torch.int64), 1, 2)
    with pytest.raises(ValueError, match="one shape and dtype"):
        tp.scatter_add_blocks([x], 0, x.half(), *tables, 1, 2)


def test_backend_is_the_triton_module(monkeypatch):
    monkeypatch.setenv("MERGE_ENGINE_KERNELS", "1")
    backends.triton_backend.cache_clear()
    try:
        assert backends.triton_backend("permute") is tp
    finally:
        backends.triton_backend.cache_clear()


# Per (arch, dtype, kernel): its PTX floating-point and conversion instructions (gpu_lowering.py).
COMPILE_FOR_GPUS = r"""
from merge_engine.triton_kernels import permute as tp
tables = dict(pointers_ptr="*i64", src_layer_ptr="*i64", src_block_ptr="*i64")
sizes = dict(row="i64", span="i64", tiles="i64", BLOCK="constexpr")
for arch in (80, 90):
    for dtype, bits in (("fp32", "i32"), ("bf16", "i16"), ("fp16", "i16")):
        kernels = ((tp._gather_kernel, dict(**tables, out_ptr=f"*{bits}", **sizes)),
                   (tp._scatter_add_kernel, dict(**tables, values_ptr=f"*{dtype}", **sizes)),
                   (tp._swap_kernel, dict(first_ptr=f"*{bits}", pointers_ptr="*i64", pairs_ptr="*i64", n_pairs="i64",
                                          **sizes)))
        for kernel, signature in kernels:
            found[f"sm_{arch} {dtype} {kernel.__name__}"] = float_ops(kernel, signature, tp.BLOCK, tp._IEEE, arch)
"""


def test_kernels_lower_for_sm80_and_sm90():
    found = ptx_float_ops(COMPILE_FOR_GPUS)
    assert len(found) == 18
    for kernel, ops in found.items():
        if "scatter_add" not in kernel:
            assert ops == [], (kernel, ops)  # moves only
            continue
        arithmetic = [op for op in ops if not op.startswith("cvt")]
        # fp16 may add natively: one correctly rounded fp16 add equals the fp32 add rounded to fp16
        assert arithmetic and all(re.fullmatch(r"add\.rn\.f(32|16)", op) for op in arithmetic), (kernel, ops)
        assert not [op for op in ops if ".ftz" in op], (kernel, ops)
        assert all(".rn." in op for op in ops if re.match(r"cvt\.\w*\.?b?f16\.f32", op)), (kernel, ops)
