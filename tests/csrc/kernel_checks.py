"""Inputs and error terms shared by the kernel tests of every backend (CPU, CUDA, Triton)."""
import zlib

import torch

from merge_engine.ops.consensus import _sparsify


def make_inputs(shape, dtype, k, seed, ties=False, zero_delta=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = []
    for _ in range(k):
        noise = torch.randn(shape, generator=g) * 0.1
        if ties:  # a few magnitude levels: long runs of equal |delta|
            noise = torch.randint(-3, 4, shape, generator=g).float() * 0.125
            base = base.round()
        experts.append(base.clone() if zero_delta else base + noise)
    return base.to(dtype).to(device), [e.to(dtype).to(device) for e in experts]


def weighted_contributions(base, experts, kw):
    """(sum_i w_i * kept_i, sum_i |w_i * kept_i|) in fp64, kept_i from the reference sparsifiers."""
    base, experts = base.cpu(), [e.cpu() for e in experts]
    signed = torch.zeros(base.shape, dtype=torch.float64)
    total = torch.zeros(base.shape, dtype=torch.float64)
    k = len(experts)
    for i, e in enumerate(experts):
        delta = e - base
        if kw.get("sparsify"):
            delta = _sparsify(delta, kw["sparsify"], kw["densities"][i], (kw.get("gammas") or [0] * k)[i],
                              (kw.get("epsilons") or [0] * k)[i], kw.get("rescale", False), kw.get("seed", 0),
                              kw.get("tensor_name", ""), i)
        signed += kw["weights"][i] * delta.double()
        total += abs(kw["weights"][i]) * delta.double().abs()
    return signed, total


def seed_of(*parts) -> int:
    """A seed stable across runs, from the test's parameters; printed so a failure can be replayed."""
    seed = zlib.crc32(repr(parts).encode())
    print(f"seed {seed} for {parts}")
    return seed


BITS = {2: torch.int16, 4: torch.int32}  # integer views of the kernel dtypes


def random_bits(shape, dtype, g):
    """Every bit pattern of the dtype is as likely: NaNs, infinities, subnormals and signed zeros too."""
    width = BITS[dtype.itemsize]
    info = torch.iinfo(width)
    return torch.randint(info.min, info.max + 1, shape, generator=g, dtype=torch.int64).to(width).view(dtype)


def spread_values(shape, dtype, g):
    """Values from subnormal to large magnitudes (per dtype), with a few signed zeros; no NaN or Inf."""
    low, high = {torch.float32: (-140, 60), torch.bfloat16: (-130, 60), torch.float16: (-24, 10)}[dtype]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(low, high, shape, generator=g)
    x[torch.rand(shape, generator=g) < 0.05] = 0.0
    x[torch.rand(shape, generator=g) < 0.05] = -0.0
    return x.to(dtype)
