"""The C++ CPU Fisher kernels (csrc/cpu/fisher.cpp): how the ops reach them, and their output buffers.

Their values, bit for bit against the references (every params x Fisher dtype pair, odd sizes, K = 1
to 40, zero, subnormal and overflowing Fishers, bad values), are tested with the other backends'
in tests/kernels/test_fisher.py.
"""
import pytest
import torch

from merge_engine.ops import backends
from merge_engine.ops import fisher as fisher_ops
from merge_engine.ops.fisher import fisher_merge_reference
from tests.conftest import seed_of
from tests.kernels.test_fisher import make_models

if not backends.kernels_enabled():
    pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0", allow_module_level=True)

pytestmark = pytest.mark.cpu_kernels


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
    args = make_models((1023,), torch.bfloat16, torch.float32, 2, seed_of("route"))
    assert torch.equal(fisher_ops.fisher_merge(*args), fisher_merge_reference(*args))
    fisher_ops.accumulate_fisher(torch.zeros(7), torch.ones(7), 1.0)
    float64 = [p.double() for p in args[0]]
    fisher_ops.fisher_merge(float64, args[1], args[2], args[3])  # fp64 stays on the reference
    assert calls == ["merge", "accumulate"]


def test_merge_into_a_callers_buffer(ext):
    params, fishers, coefficients, floors = make_models((37, 53), torch.bfloat16, torch.float32, 3, seed_of("out"))
    want = fisher_ops.fisher_merge(params, fishers, coefficients, floors)
    out = torch.full((37, 53), float("nan"), dtype=torch.bfloat16)
    got = fisher_ops.fisher_merge(params, fishers, coefficients, floors, out=out)
    assert got is out and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU tensor"):
        ext.fisher_merge(params, fishers, coefficients, floors, out.float())
    with pytest.raises(RuntimeError, match="out must not overlap an input"):
        ext.fisher_merge(params, fishers, coefficients, floors, params[2])
