"""The C++ CPU Fisher kernels (csrc/cpu/fisher.cpp) against the PyTorch references, bit for bit.

The kernels perform the references' fp32 operations in the same order (-ffp-contract=off), so merged
values and accumulated Fishers must be identical, for every params x Fisher dtype pair, odd sizes,
K = 1..8, floors with and without zero, and regions where no model has Fisher information.
"""
import zlib

import pytest
import torch

from merge_engine.ops import backends
from merge_engine.ops import fisher as fisher_ops
from merge_engine.ops.fisher import accumulate_fisher_reference, fisher_merge_reference

if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [(1,), (7,), (1023,), (4097,), (37, 53)]


@pytest.fixture(scope="module")
def ext():
    module = backends.cpu_extension()
    assert module is not None, "the CPU extension failed to build (see the warning above)"
    return module


def seed_of(*parts) -> int:
    seed = zlib.crc32(repr(parts).encode())
    print(f"seed {seed} for {parts}")
    return seed


def make_inputs(shape, k, dtype, fisher_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]
    fishers = []
    for _ in range(k):
        f = torch.rand(shape, generator=g) ** 3 * 10.0 ** float(torch.randint(-5, 3, (), generator=g))
        f[torch.rand(shape, generator=g) < 0.2] = 0  # some entries carry no information
        fishers.append(f.to(fisher_dtype))
    coefficients = (torch.rand(k, generator=g) * 2).tolist()
    floors = [1e-6 if j == 0 else 0.0 for j in range(k)]
    return params, fishers, coefficients, floors


@pytest.mark.parametrize("fisher_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_merge_equals_reference(ext, k, shape, dtype, fisher_dtype):
    args = make_inputs(shape, k, dtype, fisher_dtype, seed_of(k, shape, dtype, fisher_dtype))
    assert torch.equal(ext.fisher_merge(*args), fisher_merge_reference(*args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_without_floors_falls_back_to_the_first_model(ext, dtype):
    params, fishers, coefficients, _ = make_inputs((4097,), 3, dtype, torch.float32, seed_of("nofloor", dtype))
    for f in fishers:
        f[:500] = 0
    got = ext.fisher_merge(params, fishers, coefficients, [0.0, 0.0, 0.0])
    assert torch.equal(got, fisher_merge_reference(params, fishers, coefficients, [0.0, 0.0, 0.0]))
    assert torch.equal(got[:500], params[0][:500])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fisher_dtype", DTYPES)
def test_invalid_fisher_values_raise_value_error(ext, bad, fisher_dtype):
    params, fishers, coefficients, floors = make_inputs((1023,), 3, torch.float32, fisher_dtype, seed_of("bad"))
    fishers[2][[5, 700]] = bad
    with pytest.raises(ValueError, match=fisher_ops.invalid_fisher_message(2, 2).replace("(", r"\(").replace(")", r"\)")):
        ext.fisher_merge(params, fishers, coefficients, floors)


@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("fisher_dtype", DTYPES)
@pytest.mark.parametrize("shape", SIZES)
def test_accumulate_equals_reference(ext, shape, fisher_dtype, grad_dtype):
    g = torch.Generator().manual_seed(seed_of("acc", shape, fisher_dtype, grad_dtype))
    start = (torch.rand(shape, generator=g) * 3).to(fisher_dtype)
    got, want = start.clone(), start.clone()
    for scale in (1.0, 0.37, 8.0):
        grad = torch.randn(shape, generator=g).to(grad_dtype)
        ext.accumulate_fisher(got, grad, scale)
        accumulate_fisher_reference(want, grad, scale)
    assert torch.equal(got, want)


def test_the_ops_route_to_the_cpu_kernels(ext, monkeypatch):
    calls = []

    class Spy:
        def fisher_merge(self, *args):
            calls.append("merge")
            return ext.fisher_merge(*args)

        def accumulate_fisher(self, *args):
            calls.append("accumulate")
            return ext.accumulate_fisher(*args)

    monkeypatch.setattr(backends, "cpu_extension", lambda: Spy())
    args = make_inputs((1023,), 2, torch.bfloat16, torch.float32, seed_of("route"))
    assert torch.equal(fisher_ops.fisher_merge(*args), fisher_merge_reference(*args))
    fisher_ops.accumulate_fisher(torch.zeros(7), torch.ones(7), 1.0)
    float64 = [p.double() for p in args[0]]
    fisher_ops.fisher_merge(float64, args[1], args[2], args[3])  # fp64 stays on the reference
    assert calls == ["merge", "accumulate"]


def test_merge_into_a_callers_buffer(ext):
    params, fishers, coefficients, floors = make_inputs((37, 53), 3, torch.bfloat16, torch.float32, seed_of("out"))
    want = fisher_ops.fisher_merge(params, fishers, coefficients, floors)
    out = torch.full((37, 53), float("nan"), dtype=torch.bfloat16)
    got = fisher_ops.fisher_merge(params, fishers, coefficients, floors, out=out)
    assert got is out and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU tensor"):
        ext.fisher_merge(params, fishers, coefficients, floors, out.float())
    with pytest.raises(RuntimeError, match="out must not overlap an input"):
        ext.fisher_merge(params, fishers, coefficients, floors, params[2])
