"""The Triton Fisher kernels (triton_kernels/fisher.py): their argument checks, their dispatch and their
GPU lowering. Their values, bit for bit against the references, are tested with the other backends'
in tests/kernels/test_fisher.py (through the interpreter there too).

The GPU lowering is checked without a GPU too: both kernels are compiled for sm_80 and sm_90, for every
dtype pair, and their PTX must round every fp32 add, multiply and divide explicitly to nearest (.rn:
ptxas fuses no such pair into an fma, and the division is IEEE) and never flush subnormals (.ftz).
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from merge_engine.ops import backends  # noqa: E402
from merge_engine.triton_kernels import fisher as tf  # noqa: E402
from tests.triton_kernels.gpu_lowering import check_ieee_rounding, ptx_float_ops  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# ---- edges and plumbing ----

def test_unsupported_inputs_are_rejected():
    x = torch.ones(8, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tf.fisher_merge([x.double()], [x], [1.0], [0.0])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tf.accumulate_fisher(x, x.double(), 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        tf.fisher_merge([x, x.t()], [x, x], [1.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="contiguous tensors on"):
        tf.accumulate_fisher(x, x.to("meta"), 1.0)
    with pytest.raises(ValueError, match="one Fisher, coefficient and floor"):
        tf.fisher_merge([x, x], [x], [1.0, 1.0], [0.0, 0.0])


def test_backend_is_the_triton_module(monkeypatch):
    monkeypatch.setenv("MERGE_ENGINE_KERNELS", "1")
    backends.triton_backend.cache_clear()
    try:
        assert backends.triton_backend("fisher") is tf
    finally:
        backends.triton_backend.cache_clear()


# Per (arch, dtypes, kernel): its PTX floating-point and conversion instructions (gpu_lowering.py).
COMPILE_FOR_GPUS = r"""
from merge_engine.triton_kernels import fisher as tf
dtypes = ["fp32", "bf16", "fp16"]
for arch in (80, 90):
    for a in dtypes:
        for b in dtypes:
            merge = dict(param0_ptr=f"*{a}", fisher0_ptr=f"*{b}", params_ptr="*i64", fishers_ptr="*i64",
                         coefficients_ptr="*fp32", floors_ptr="*fp32", bad_ptr="*i64", out_ptr=f"*{a}", n="i64",
                         K="i32", BLOCK="constexpr")
            accumulate = dict(fisher_ptr=f"*{a}", grad_ptr=f"*{b}", n="i64", scale="fp32", BLOCK="constexpr")
            for kernel, signature in ((tf._merge_kernel, merge), (tf._accumulate_kernel, accumulate)):
                found[f"sm_{arch} {a} {b} {kernel.__name__}"] = float_ops(kernel, signature, tf.BLOCK, tf._IEEE, arch)
"""


def test_kernels_lower_to_ieee_ptx_for_sm80_and_sm90():
    found = ptx_float_ops(COMPILE_FOR_GPUS)
    assert len(found) == 36
    check_ieee_rounding(found)
