"""The C++ CPU extension for the CPU kernel tests (test_cuda_kernels.py overrides ext with the CUDA one)."""
import pytest

from tests.kernels.conftest import load_backend


@pytest.fixture(scope="module")
def ext():
    return load_backend("cpu", "").module
