"""The Gram kernels of every backend (C++ CPU csrc/cpu/gram.cpp, CUDA csrc/cuda/gram.cu, Triton
triton_kernels/gram.py) against an fp64 reference of the kept rows.

The kernels sum in fp32 in their own order (BLAS blocks, tiles), so results are not bit-identical to
the reference. What must hold (kernel_checks.gram_expected states and justifies the bound): after two
accumulations onto a non-zero start, every upper-triangle entry (j >= i) is within
gamma(T + 1) (|start| + sum_t |x_ti| |x_tj|) of the exact fp64 sum of the kept rows, and every
strictly lower entry keeps the start's exact bits (random bit patterns: NaNs, infinities, signed
zeros); mirror_upper_ then makes the matrix exactly symmetric. Masked-out rows carry as much weight
as kept ones, so a kernel that read them would exceed the bound by orders of magnitude. On a GPU,
bf16 and fp16 sums run on tensor cores, which truncate: their bound is taken with
kernel_checks.TENSOR_CORE_UNIT instead of 2^-24.

Sizes per backend, at its thresholds; (d, tokens, mask, dtype) over a pairwise covering set, so that
every size class meets every mask kind and dtype, and each d every token count:
- cpu: d = 1, 7 and 33 (one narrow leaf), 256 (two leaves of kLeaf = 128 columns), 513 (four and a
  one-column one: five leaves, split 2 + 3) and 1100 (eight and a 76-column one); 1, 5 and 4097
  tokens (4097: two chunks of kChunk = 4096 rows); and 10000 masked tokens (more than a chunk kept);
- cuda: one 64 x 64 tile (1, 7, 64), tiles whose edge cuts the triangle (65, 513), many (1100);
  token counts around the 16- and 32-token steps (1, 5, 33) and 4097;
- triton (the interpreter is slow): d = 1, 7, 33, 70 and 130 (one 64 x 64 tile; 2 x 2 and 3 x 3
  tiles, the last partial, so diagonal and off-diagonal tiles of the triangle), 1, 5 and 130 tokens
  (steps of BLOCK_T = 32, the last partial).
"""
import torch

from merge_engine.ops.gram import _accumulate_with, mirror_upper_
from tests.conftest import DTYPES, pairwise, seed_of
from tests.csrc.kernel_checks import (
    GRAM_MASKS,
    TENSOR_CORE_UNIT,
    UNIT_ROUNDOFF,
    assert_gram,
    gram_activations,
    gram_expected,
    gram_mask,
    gram_start,
)
from tests.kernels.conftest import on, per_backend

FAMILY = "gram"


def _cases(d_tokens, *, where=None):
    """(d, tokens, mask kind, dtype) tuples: pairwise over the (d, tokens) classes, masks and dtypes."""
    return [(d, tokens, mask, dtype) for (d, tokens), mask, dtype in pairwise(d_tokens, GRAM_MASKS, DTYPES, where=where)]


CASES = {
    # d = 1100 with 4097 tokens (its fp64 reference takes seconds) only unmasked or randomly masked
    "cpu": [(d, tokens, mask, dtype) for d, tokens, mask, dtype in pairwise(
        [1, 7, 33, 256, 513, 1100], [1, 5, 4097], GRAM_MASKS, DTYPES,
        where=lambda d, tokens, mask, dtype: (d, tokens) != (1100, 4097) or mask in (None, "random"))]
    + [(33, 10000, "random", dtype) for dtype in DTYPES],
    "cuda": pairwise([1, 7, 64, 65, 513, 1100], [1, 5, 33, 4097], GRAM_MASKS, DTYPES),
    "triton": _cases([(1, 1), (1, 130), (7, 5), (33, 130), (70, 1), (70, 130), (130, 5)]),
}


def unit_of(backend, dtype):
    """The unit roundoff of the bound: tensor cores' for bf16 and fp16 sums on a GPU (sm_80 and later)."""
    tensor_cores = (backend.device == "cuda" and dtype != torch.float32
                    and torch.cuda.get_device_capability()[0] >= 8)
    return TENSOR_CORE_UNIT if tensor_cores else UNIT_ROUNDOFF


def check_two_accumulations(backend, accumulate, lead_shape, d, dtype, mask_kind, seed):
    """Two batches onto a random start, checked against the fp64 reference; then mirror_upper_."""
    g = torch.Generator().manual_seed(seed)
    start = gram_start(d, g, backend.device)
    gram = start.clone()
    batches = [(gram_activations((*lead_shape, d), dtype, g, backend.device),
                gram_mask(mask_kind, lead_shape, g, backend.device)) for _ in range(2)]
    for x, mask in batches:
        accumulate(gram, x, mask)
    want, bound = gram_expected(start, batches, unit_of(backend, dtype))
    assert_gram(gram, start, want, bound, f"seed {seed}")
    if mask_kind == "none kept":
        assert torch.equal(gram.view(torch.int32), start.view(torch.int32)), f"seed {seed}: no token kept, gram changed"
    upper = gram.triu()
    mirror_upper_(gram)
    assert torch.equal(gram, gram.T) and torch.equal(gram.triu(), upper), f"seed {seed}: mirror_upper_"


@per_backend("d, tokens, mask_kind, dtype", CASES)
def test_accumulate_within_bound(backend, d, tokens, mask_kind, dtype):
    seed = seed_of("gram", backend.name, d, tokens, dtype, mask_kind)
    check_two_accumulations(backend, lambda *args: _accumulate_with(backend.module, *args), (tokens,), d, dtype,
                            mask_kind, seed)


@on()
def test_leading_dims_through_the_dispatch(backend):
    """_accumulate_with flattens [..., d] activations and their mask for the kernel."""
    seed = seed_of("gram leading dims")
    check_two_accumulations(backend, lambda *args: _accumulate_with(backend.module, *args), (3, 40), 70,
                            torch.float16, "random", seed)


@on()
def test_empty_inputs_leave_gram_unchanged(backend):
    gram = torch.ones(5, 5, device=backend.device)
    backend.module.accumulate_gram(gram, torch.empty(0, 5, device=backend.device, dtype=torch.bfloat16), None)
    backend.module.accumulate_gram(torch.empty(0, 0, device=backend.device), torch.empty(3, 0, device=backend.device),
                                   None)
    assert torch.equal(gram, torch.ones(5, 5, device=backend.device))
