"""Inputs and error terms shared by the kernel tests of every backend (CPU, CUDA, Triton)."""
import sys
import threading
import time

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


# ---- Gram accumulation (merge_engine/ops/gram.py) ----

GRAM_MASKS = [None, "random", "none kept", "all kept"]
UNIT_ROUNDOFF = 2.0 ** -24  # fp32
# NVIDIA tensor cores (bf16/fp16 products, fp32 accumulation) align the addends of each k-term block
# multiply-add to the largest exponent and truncate them (Fasi, Higham, Mikaitis, Pranesh, "Numerical
# behavior of NVIDIA tensor cores", PeerJ CS 2021): each loses under one ulp of the largest (2u
# relative to it), where round to nearest loses half an ulp of the sum; about 2u (1 + 1/k) per term
# over a whole sum instead of u. Their bound is taken with u = 2^-22.
TENSOR_CORE_UNIT = 2.0 ** -22


def gram_activations(shape, dtype, g, device="cpu"):
    """Activations [..., d] of the dtype: normal values times a power of two per column (2^-6 .. 2^6,
    so the Gram's entries span many magnitudes), 5% exact zeros."""
    scale = 2.0 ** torch.randint(-6, 7, shape[-1:], generator=g)
    x = torch.randn(shape, generator=g) * scale
    x[torch.rand(shape, generator=g) < 0.05] = 0.0
    return x.to(dtype).to(device)


def gram_mask(kind, lead_shape, g, device="cpu"):
    """None, or a bool mask over the leading dims: random (70% kept), none kept or all kept."""
    if kind is None:
        return None
    keep = {"random": torch.rand(lead_shape, generator=g) < 0.7, "none kept": torch.zeros(lead_shape, dtype=torch.bool),
            "all kept": torch.ones(lead_shape, dtype=torch.bool)}[kind]
    return keep.to(device)


def gram_start(d, g, device="cpu"):
    """A non-zero fp32 start for the accumulation: normal values in the upper triangle, random bit
    patterns (NaNs with payloads, infinities, signed zeros) in the strictly lower one, so that any
    write there, even of an unchanged value plus 0, shows in its bits."""
    start = torch.randn(d, d, generator=g) * 4
    lower = torch.ones(d, d, dtype=torch.bool).tril_(-1)
    start[lower] = random_bits((d, d), torch.float32, g)[lower]
    return start.to(device)


def gram_expected(start, batches, unit=UNIT_ROUNDOFF):
    """(want, bound), fp64 on the CPU, for start accumulated with the Gram of every (x, mask) batch.

    want = start + sum over batches of X^T X over the kept rows X (exact in fp64: products of fp32
    values have 48 significant bits, and the sums are far from fp64's rounding at these sizes).
    bound, the bound of ops/gram.py with the start as one more term: each entry is an fp32 sum of
    n = T + 1 terms (T kept tokens over all batches), the start exact and each product exact (bf16,
    fp16) or rounded once (fp32), added in any order by n - 1 roundings, so
        |got - want| <= gamma(T + 1) (|start| + sum_t |x_ti| |x_tj|),  gamma(n) = n u / (1 - n u),
    u = unit: fp32's 2^-24, or TENSOR_CORE_UNIT for sums on tensor cores.
    Entries of the strictly lower triangle are not compared (the start's are not finite)."""
    upper = torch.ones(start.shape, dtype=torch.bool).triu_()
    base = torch.where(upper, start.cpu().double(), 0.0)
    want, magnitude, tokens = base.clone(), base.abs(), 0
    for x, mask in batches:
        rows = x.cpu().reshape(-1, x.shape[-1]).double()
        if mask is not None:
            rows = rows[mask.cpu().reshape(-1)]
        want += rows.T @ rows
        magnitude += rows.abs().T @ rows.abs()
        tokens += rows.shape[0]
    n = tokens + 1
    return want, n * unit / (1 - n * unit) * magnitude


def assert_gram(got, start, want, bound, context):
    """The upper triangle within the bound of want; the strictly lower triangle start's exact bits."""
    got, start = got.cpu(), start.cpu()
    assert got.dtype == torch.float32 and got.shape == start.shape, f"{context}: {got.dtype} {list(got.shape)}"
    upper = torch.ones(got.shape, dtype=torch.bool).triu_()
    excess = ((got.double() - want).abs() - bound)[upper]
    assert not (excess > 0).any() and not got[upper].isnan().any(), (
        f"{context}: {int((excess > 0).sum())} upper entries exceed the bound, by up to {float(excess.max())}")
    changed = (got.view(torch.int32) != start.view(torch.int32)) & ~upper
    assert not changed.any(), f"{context}: {int(changed.sum())} entries of the strictly lower triangle changed"


def another_thread_ran_during(call, attempts: int = 10) -> bool:
    """Whether a Python thread waiting for the GIL ran while call() ran, in any of a few attempts (a short call can
    end before the thread wakes)."""
    return any(_ran_during(call) for _ in range(attempts))


def _ran_during(call) -> bool:
    """The switch interval is set past the test's length, so the waiting thread gets the GIL only where the caller
    lets it go: the GIL-holding caller sets the flag, wakes the thread, gives it a moment to wait for the GIL, and
    calls; the thread reads the flag set only if the call released the GIL. The result is kept until the flag is
    cleared: freeing a tensor can let the GIL go."""
    inside, seen, woken = [False], [], threading.Event()

    def waiting():
        woken.wait()
        seen.append(inside[0])
    thread = threading.Thread(target=waiting)
    thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000)
    try:
        inside[0] = True
        woken.set()
        awake = time.monotonic() + 0.02
        while time.monotonic() < awake:  # (holding the GIL)
            pass
        result = call()
        inside[0] = False
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    del result
    return seen[0]
