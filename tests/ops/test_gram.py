"""The Gram op's contract (merge_engine/ops/gram.py), through merge_engine.ops on whatever backend serves
the CPU: the upper triangle equals the fp64 Gram of the kept rows within the stated bound, masked rows
count for nothing, mirror_upper_ makes the result exactly symmetric, and pack/unpack round-trip exactly.
(The compiled kernels are checked against the reference in tests/kernels/test_gram.py.)

Bound: gamma(T + 1) * (|X|^T |X|), u = 2^-24 (module docstring of ops/gram.py): any fp32 summation order
of T products, each exact (16-bit inputs) or rounded once (fp32), stays within it.
"""
import zlib

import pytest
import torch

from merge_engine import ops
from merge_engine.ops.gram import pack_upper, unpack_upper

U = 2.0 ** -24


def error_bound(rows64: torch.Tensor) -> torch.Tensor:
    n = rows64.shape[0] + 1
    return (n * U / (1 - n * U)) * (rows64.abs().T @ rows64.abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 11, 33), (257, 65)])
@pytest.mark.parametrize("masked", [False, True])
def test_upper_triangle_within_bound_of_fp64(dtype, shape, masked):
    seed = zlib.crc32(repr((dtype, shape, masked)).encode())
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 4).to(dtype)
    mask = torch.rand(shape[:-1], generator=g) < 0.6 if masked else None
    start = torch.randn(shape[-1], shape[-1], generator=g)
    start = start + start.T
    gram = start.clone()
    ops.accumulate_gram(gram, x, mask)
    ops.accumulate_gram(gram, x, mask)  # twice onto a non-zero start
    rows = x.reshape(-1, shape[-1]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    rows = torch.cat([rows, rows])
    exact = start.double() + rows.T @ rows
    upper = torch.ones_like(exact, dtype=torch.bool).triu_()
    err = (gram.double() - exact).abs()
    bound = error_bound(rows) + start.double().abs() * 2 * U  # the start value's own rounding
    assert (err[upper] <= bound[upper]).all(), f"seed {seed}: max excess {float((err - bound)[upper].max())}"
    ops.mirror_upper_(gram)
    assert torch.equal(gram, gram.T)


def test_all_masked_leaves_the_gram_unchanged():
    gram = torch.randn(6, 6)
    before = gram.clone()
    ops.accumulate_gram(gram, torch.randn(4, 5, 6), torch.zeros(4, 5, dtype=torch.bool))
    assert torch.equal(gram, before)


@pytest.mark.parametrize("d", [1, 2, 9])
def test_pack_unpack_round_trip(d):
    a = torch.randn(d, d)
    a = a + a.T
    packed = pack_upper(a)
    assert packed.shape == (d * (d + 1) // 2,)
    assert torch.equal(unpack_upper(packed, d), a)


def largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation any op made while fn ran (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


def test_pack_and_unpack_allocate_nothing_larger_than_their_result():
    """A 70B model's MLP Gram (d = 28672) takes 3.3 GB; index tensors of its triangle would take 6.6 GB more."""
    d = 300
    a = torch.randn(d, d)
    a = a + a.T
    packed = pack_upper(a)
    assert largest_allocation(lambda: pack_upper(a)) <= packed.nbytes
    assert largest_allocation(lambda: unpack_upper(packed, d)) <= a.nbytes


@pytest.mark.parametrize("gram, x, mask, message", [
    (torch.zeros(3, 4), torch.zeros(2, 4), None, "gram must be"),
    (torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(2, 4), None, "float32"),
    (torch.zeros(4, 4), torch.zeros(2, 4, dtype=torch.int32), None, "floating point"),
    (torch.zeros(4, 4), torch.zeros(2, 3, 4), torch.ones(3, 2, dtype=torch.bool), "mask must be"),
    (torch.zeros(4, 4), torch.zeros(2, 4), torch.ones(2), "mask must be"),
])
def test_bad_arguments_are_refused(gram, x, mask, message):
    with pytest.raises(ValueError, match=message):
        ops.accumulate_gram(gram, x, mask)
