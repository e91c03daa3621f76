"""Counter-based random numbers: Philox4x32-10 keyed by (seed, tensor name), counted by element index.

Element i of stream s (the expert index) takes word i % 4 of Philox4x32-10 applied to the counter
(i // 4 low 32 bits, i // 4 high 32 bits, s, 0): one Philox call yields four elements' bits.

Every random decision of DARE and DELLA is a pure function of (seed, tensor name, expert index,
element index), so a merge gives the same bits whatever the execution order, thread count or device,
and every backend (this reference, C++, Triton, CUDA) can reproduce it exactly.

Bits -> uniform: u = (x >> 8) * 2**-24, exactly representable in fp32, in [0, 1); an element is
kept when u < p with p in fp32.

The reference works on int64 tensors holding uint32 values; 32x32-bit products are split into
16-bit halves so no intermediate exceeds 2**49 (no reliance on signed overflow).
"""
from __future__ import annotations

import hashlib

import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_U32 = 0xFFFFFFFF


def philox_key(seed: int, tensor_name: str) -> tuple[int, int]:
    """The 64-bit Philox key of one tensor: BLAKE2b of the seed and the tensor name."""
    digest = hashlib.blake2b(f"{seed}\x00{tensor_name}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value & _U32, value >> 32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 values a (int64 tensor) and constant m."""
    p_hi = a * (m >> 16)  # < 2**48
    p_lo = a * (m & 0xFFFF)  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _U32
    return hi, lo


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors of uint32 counters; returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def random_bits(numel: int, key: tuple[int, int], stream: int, device=None, start: int = 0) -> torch.Tensor:
    """uint32 words (as int64) for elements start..start+numel-1 of one stream (expert index)."""
    first, last = start // 4, (start + numel + 3) // 4
    block = torch.arange(first, last, dtype=torch.int64, device=device)
    counter = (block & _U32, block >> 32, torch.full_like(block, stream & _U32), torch.zeros_like(block))
    words = torch.stack(philox4x32(counter, key), dim=1).reshape(-1)  # element 4b + j <- word j of block b
    return words[start - 4 * first:start - 4 * first + numel]


def uniform(numel: int, key: tuple[int, int], stream: int, device=None, start: int = 0) -> torch.Tensor:
    """fp32 uniforms in [0, 1) with 24 random bits, as defined in the module docstring."""
    return (random_bits(numel, key, stream, device, start) >> 8).to(torch.float32) * 2.0**-24
