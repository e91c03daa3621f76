"""The backends of the kernel tests: one test per property of an op family, run on every backend that
implements it (the ops' _*_with helpers take any of them):
- cpu: the C++ CPU kernels (csrc/cpu), marked cpu_kernels (tools/test.sh reruns those on the portable
  lanes); skipped only when MERGE_ENGINE_KERNELS=0 disables them;
- cuda: the CUDA kernels (csrc/cuda), skipped with the reason without a GPU;
- triton: the Triton kernels (triton_kernels/), marked triton: through the interpreter on CPU tensors
  (TRITON_INTERPRET=1, as tools/test.sh sets), else on a GPU; skipped with the reason without either.
Inputs are made on the CPU from the test's seed (tests.conftest.seed_of) and moved to backend.device;
references run on CPU copies."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import pytest
import torch

from merge_engine.ops import backends

MARKS = {"cpu": [pytest.mark.cpu_kernels], "cuda": [], "triton": [pytest.mark.triton]}
ALL = ("cpu", "cuda", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    module: object  # the extension, or the family's Triton module
    device: str

    def put(self, tensors):
        """A copy of a tensor, or of a list of them, on the backend's device: never the tensor itself, which on
        the CPU backends `.to` would return, so an in-place kernel cannot change the reference's inputs."""
        if isinstance(tensors, (list, tuple)):
            return [t.to(self.device, copy=True) for t in tensors]
        return tensors.to(self.device, copy=True)


def load_backend(name: str, family: str) -> Backend:
    if name == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("Triton kernels need a GPU or the interpreter (TRITON_INTERPRET=1)")
        pytest.importorskip("triton")
        device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
        return Backend(name, importlib.import_module(f"merge_engine.triton_kernels.{family}"), device)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA kernels cannot run here (tests/csrc/test_cuda_compile.py "
                    "checks that they compile)")
    if not backends.kernels_enabled():
        pytest.skip("compiled kernels disabled by MERGE_ENGINE_KERNELS=0")
    module = backends.cpu_extension() if name == "cpu" else backends.cuda_extension()
    assert module is not None, f"the {name.upper()} extension failed to build (see the warning above)"
    return Backend(name, module, name)


@pytest.fixture
def backend(request) -> Backend:
    """The backend named by the test's parameter, for the op family of its module (FAMILY)."""
    return load_backend(request.param, request.module.FAMILY)


def _id(value) -> str:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else str(value)


def on(*names):
    """parametrize over the named backends (all by default), each with its marks."""
    return pytest.mark.parametrize("backend", [pytest.param(n, marks=MARKS[n], id=n) for n in names or ALL],
                                   indirect=True)


def per_backend(argnames: str, cases: dict):
    """parametrize('backend, ' + argnames) over cases[backend] (a list of tuples) for each backend named
    in cases: backends share a property but not their thresholds, so each gets the sizes its code paths
    need (the interpreter's small ones for Triton)."""
    params = [pytest.param(name, *case, marks=MARKS[name], id="-".join(map(_id, (name, *case))))
              for name, backend_cases in cases.items() for case in backend_cases]
    return pytest.mark.parametrize("backend, " + argnames, params, indirect=["backend"])
