"""Philox4x32-10 reference: known-answer vectors and the counter layout the kernels must reproduce."""
import torch

from merge_engine.ops.random import philox4x32, philox_key, random_bits, uniform

# Known-answer vectors of Random123 (kat_vectors, philox4x32_10): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answers():
    for counter, key, expected in KAT:
        out = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
        assert tuple(int(w) for w in out) == expected


def test_element_i_is_word_i_mod_4_of_counter_i_div_4():
    key = philox_key(7, "model.layers.0.mlp.up_proj.weight")
    bits = random_bits(11, key, stream=3)
    for i in (0, 3, 4, 10):
        counter = tuple(torch.tensor([c], dtype=torch.int64) for c in (i // 4, 0, 3, 0))
        assert int(bits[i]) == int(philox4x32(counter, key)[i % 4])


def test_any_window_reproduces_the_same_bits():
    key = philox_key(1, "w")
    whole = random_bits(1000, key, 2)
    for start, n in ((0, 1), (1, 5), (3, 4), (5, 995), (999, 1)):
        assert torch.equal(random_bits(n, key, 2, start=start), whole[start:start + n])


def test_keys_and_streams_decorrelate():
    a = random_bits(4096, philox_key(0, "a"), 0)
    assert not torch.equal(a, random_bits(4096, philox_key(0, "b"), 0))
    assert not torch.equal(a, random_bits(4096, philox_key(1, "a"), 0))
    assert not torch.equal(a, random_bits(4096, philox_key(0, "a"), 1))
    assert philox_key(0, "a") == philox_key(0, "a")


def test_uniform_is_24_bit_and_roughly_uniform():
    u = uniform(1 << 16, philox_key(3, "t"), 0)
    assert u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))  # exactly k / 2**24
    # 65536 samples: the mean's standard deviation is 0.29/256 ~ 0.0011; 0.006 is > 5 sigma.
    assert abs(float(u.mean()) - 0.5) < 0.006
    hist = torch.histc(u, bins=16, min=0, max=1)
    assert float(hist.min()) > 4096 * 0.9 and float(hist.max()) < 4096 * 1.1
