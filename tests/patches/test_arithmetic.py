"""The patch arithmetic (merge_engine/patches/arithmetic.py) against fp64 and exact-bit expectations."""
from fractions import Fraction

import pytest
import torch

from merge_engine.patches import arithmetic as ar
from tests.conftest import MANTISSA, seed_of, ulp


@pytest.mark.parametrize("storage", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 9), (4, 3, 6)])
def test_quantized_rows_stay_within_half_a_step(storage, shape):
    """|d - q * scale| <= scale * (1/2 + 2 qmax 2^-24): q = round(d / scale) is within 1/2 of d / scale exactly;
    d / scale in fp32 adds at most qmax 2^-24 (in steps) and q * scale rounds once more (qmax 2^-24 steps)."""
    g = torch.Generator().manual_seed(seed_of(storage, shape))
    d = torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape[:1] + (1,) * (len(shape) - 1),
                                                                          generator=g, dtype=torch.float64)
    q, scale = ar.quantize_rows(d, storage)
    assert tuple(q.shape) == ar.quantized_shape(shape, storage) and scale.dtype == torch.float32
    back = ar.dequantize_rows(q, scale, storage, shape).double()
    qmax = ar.QUANTIZED[storage]
    step = scale.double()[:, None]
    bound = step * (0.5 + 2 * qmax * 2.0**-24) + ulp(ar.as_rows(d).abs().amax(1, keepdim=True), torch.float32)
    assert ((ar.as_rows(back) - ar.as_rows(d.float().double())).abs() <= bound).all()


def test_int4_packing_round_trips_every_value_and_odd_widths():
    values = torch.arange(-7, 8, dtype=torch.int8).repeat(3, 1)[:, :15]  # 15 columns: a padded last byte
    packed = ar.pack_int4(values)
    assert packed.shape == (3, 8) and packed.dtype == torch.uint8
    assert torch.equal(ar.unpack_int4(packed, 15), values)


def test_a_zero_row_quantizes_to_zero():
    q, scale = ar.quantize_rows(torch.zeros(2, 5), "int8")
    assert not q.any() and not scale.any()
    assert not ar.dequantize_rows(q, scale, "int8", (2, 5)).any()


@pytest.mark.parametrize("dtype,storage", [(torch.bfloat16, "bfloat16"), (torch.bfloat16, "float16"),
                                           (torch.float16, "bfloat16"), (torch.float32, "float32"),
                                           (torch.float32, "bfloat16")])
def test_fixups_make_one_float_patch_exact_both_ways(dtype, storage):
    """Hostile pairs included: sign changes, zeros, -0.0, differences far larger than the weights, subnormals."""
    g = torch.Generator().manual_seed(seed_of(dtype, storage))
    base = (torch.randn(4000, generator=g) * 0.02).to(dtype)
    tuned = (base.float() + torch.randn(4000, generator=g) * 1e-3).to(dtype)
    tuned[:100] = -base[:100]
    tuned[100:200] = 0.0
    tuned[200:210] = -0.0
    tuned[210:300] = base[210:300] * 1000
    tuned[300:310] = torch.finfo(dtype).tiny / 4
    stored = ar.difference(base, tuned).to(ar.FLOATS[storage])
    index = ar.fixups(base, tuned, stored)
    applied = ar.add_scaled(base, [(stored, 1.0)])
    removed = ar.add_scaled(tuned, [(stored, -1.0)])
    applied[index], removed[index] = tuned[index], base[index]
    assert torch.equal(ar.bits(applied), ar.bits(tuned)) and torch.equal(ar.bits(removed), ar.bits(base))
    assert len(index) > 0  # the hostile elements need them
    if MANTISSA[ar.FLOATS[storage]] >= MANTISSA[dtype]:  # small changes do not (a narrower storage rounds most)
        assert len(index) < 1000


def test_fingerprint_tells_tensors_apart():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 48, generator=g).bfloat16()
    assert ar.fingerprint(t) == ar.fingerprint(t.clone())
    one = t.clone()
    one[17, 5] = one[17, 5] * 2
    swapped = t[torch.randperm(64, generator=g)]
    for other in (one, swapped, t.float(), t.reshape(48, 64), torch.where(t == 0, t, -t)):
        assert ar.fingerprint(other) != ar.fingerprint(t)


def test_sum_order_changes_a_result_by_at_most_one_ulp():
    """Patches are summed in fp32 and rounded once: another order changes the fp32 sum by a few fp32 ulps of its
    terms (which may cancel), which moves the bf16 result by at most one bf16 ulp beyond that."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(20000, generator=g) * 0.02).bfloat16()
    deltas = [(torch.randn(20000, generator=g) * 1e-3, s) for s in (0.3, -1.7, 0.9)]
    a = ar.add_scaled(w, deltas).double()
    b = ar.add_scaled(w, deltas[::-1]).double()
    terms = w.double().abs() + sum(abs(s) * d.double().abs() for d, s in deltas)
    assert ((a - b).abs() <= ulp(torch.maximum(a.abs(), b.abs()), torch.bfloat16) + 4 * 2.0**-24 * terms).all()


@pytest.mark.parametrize("dtype, gap", [(torch.bfloat16, 15), (torch.float16, 12), (torch.float32, 28)])
def test_difference_is_exact_within_the_stated_magnitude_gap(dtype, gap):
    """The module docstring's bound: values at most 2^gap apart in magnitude (either sign) subtract exactly in the
    compute precision; further apart, the difference is rounded."""
    gen = torch.Generator().manual_seed(seed_of("difference gap"))
    big = (1 + torch.rand(4096, generator=gen)) * torch.where(torch.rand(4096, generator=gen) < 0.5, -1.0, 1.0)
    small = (1 + torch.rand(4096, generator=gen)) * 2.0 ** -(gap - 1) * torch.where(
        torch.rand(4096, generator=gen) < 0.5, -1.0, 1.0)
    base, tuned = small.to(dtype), big.to(dtype)
    assert ((tuned.double().abs() / base.double().abs()) <= 2.0 ** gap).all()
    assert torch.equal(ar.difference(base, tuned).double(), tuned.double() - base.double())
    # past the gap: 2^E - (1 + 2^-m) needs E + m significant bits, more than the compute precision holds
    m = MANTISSA[dtype] - 1  # fraction bits
    far_base = torch.tensor([1 + 2.0 ** -m], dtype=dtype)
    far_tuned = torch.tensor([2.0 ** (gap + 3)], dtype=dtype)
    exact = Fraction(far_tuned.item()) - Fraction(far_base.item())
    assert Fraction(ar.difference(far_base, far_tuned).item()) != exact
