"""The Triton permute kernels (triton_kernels/permute.py): their argument checks, their dispatch and their
GPU lowering. Their values, bit for bit against the references, are tested with the other backends'
in tests/kernels/test_permute.py (through the interpreter there too).

The GPU lowering is checked without a GPU too: the kernels are compiled for sm_80 and sm_90, for each
dtype; scatter-add's PTX must add with round-to-nearest (.rn) and never flush subnormals (.ftz), and
gather and swap must do no floating-point arithmetic at all.
"""
import os
import re

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from merge_engine.ops import backends  # noqa: E402
from merge_engine.triton_kernels import permute as tp  # noqa: E402
from tests.triton_kernels.gpu_lowering import ptx_float_ops  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def test_unsupported_inputs_are_rejected():
    x = torch.ones(4, 6, device=DEVICE)
    tables = (torch.zeros(3, dtype=torch.int64, device=DEVICE), torch.arange(3, device=DEVICE))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tp.gather_blocks([x.double()], 0, *tables, 1, 2)
    with pytest.raises(ValueError, match="contiguous tensors"):
        tp.swap_blocks([x, torch.ones(6, 4, device=DEVICE).t()], torch.zeros(0, 4, dtype=torch.int64), 1, 2)
    with pytest.raises(ValueError, match="one shape and dtype"):
        tp.scatter_add_blocks([x], 0, x.half(), *tables, 1, 2)


def test_a_swap_wider_than_2_31_elements_still_swaps():
    # 2048 pairs of 128 rows of 8192 (a 70B MLP weight's blocks) are 2**31 elements per outer row: in-kernel,
    # pairs x span wrapped at 32 bits and every lane was masked off. One program and one pair run here: its
    # first BLOCK elements are what the first tile moves.
    n = tp.BLOCK
    a, b = torch.arange(n, dtype=torch.float32, device=DEVICE), -torch.arange(1, n + 1.0, device=DEVICE)
    x, y = a.clone(), b.clone()
    pairs = torch.tensor([[0, 0, 1, 0]], dtype=torch.int64, device=DEVICE)
    span = 1 << 20
    tp._swap_kernel[(1,)](tp._bits(x), tp._pointers([x, y]), pairs, 2048 * span, n, span, 1, BLOCK=tp.BLOCK,
                          **tp._IEEE)
    assert torch.equal(x, b) and torch.equal(y, a)


def test_backend_is_the_triton_module(monkeypatch):
    monkeypatch.setenv("MERGE_ENGINE_KERNELS", "1")
    backends.triton_backend.cache_clear()
    try:
        assert backends.triton_backend("permute") is tp
    finally:
        backends.triton_backend.cache_clear()


# Per (arch, dtype, kernel): its PTX floating-point and conversion instructions (gpu_lowering.py).
COMPILE_FOR_GPUS = r"""
from merge_engine.triton_kernels import permute as tp
tables = dict(pointers_ptr="*i64", src_layer_ptr="*i64", src_block_ptr="*i64")
sizes = dict(row="i64", span="i64", tiles="i64", BLOCK="constexpr")
for arch in (80, 90):
    for dtype, bits in (("fp32", "i32"), ("bf16", "i16"), ("fp16", "i16")):
        kernels = ((tp._gather_kernel, dict(**tables, out_ptr=f"*{bits}", **sizes)),
                   (tp._scatter_add_kernel, dict(**tables, values_ptr=f"*{dtype}", **sizes)),
                   (tp._swap_kernel, dict(first_ptr=f"*{bits}", pointers_ptr="*i64", pairs_ptr="*i64", width="i64",
                                          **sizes)))
        for kernel, signature in kernels:
            found[f"sm_{arch} {dtype} {kernel.__name__}"] = float_ops(kernel, signature, tp.BLOCK, tp._IEEE, arch)
"""


def test_kernels_lower_for_sm80_and_sm90():
    found = ptx_float_ops(COMPILE_FOR_GPUS)
    assert len(found) == 18
    for kernel, ops in found.items():
        if "scatter_add" not in kernel:
            assert ops == [], (kernel, ops)  # moves only
            continue
        arithmetic = [op for op in ops if not op.startswith("cvt")]
        # fp16 may add natively: one correctly rounded fp16 add equals the fp32 add rounded to fp16
        assert arithmetic and all(re.fullmatch(r"add\.rn\.f(32|16)", op) for op in arithmetic), (kernel, ops)
        assert not [op for op in ops if ".ftz" in op], (kernel, ops)
        assert all(".rn." in op for op in ops if re.match(r"cvt\.\w*\.?b?f16\.f32", op)), (kernel, ops)


# Compiled with the int32 sizes launches pass for tensors under 2**31 elements: the only 32-bit product in the
# kernels is the program id's remainder by its tiles (_element_of, exact: both are below 2**31). The swap kernel's
# width was once pairs x span formed in the kernel, a 32-bit product that wrapped at 2**31 elements.
WRAPPING_PRODUCTS = r"""
from merge_engine.triton_kernels import permute as tp
sizes = dict(row="i32", span="i32", tiles="i32", BLOCK="constexpr")
tables = dict(pointers_ptr="*i64", src_layer_ptr="*i64", src_block_ptr="*i64")
for kernel, signature in ((tp._gather_kernel, dict(**tables, out_ptr="*i16", **sizes)),
                          (tp._swap_kernel, dict(first_ptr="*i16", pointers_ptr="*i64", pairs_ptr="*i64", width="i32",
                                                 **sizes))):
    found[kernel.__name__] = ptx_ops(kernel, signature, {"BLOCK": tp.BLOCK}, tp._IEEE, 90,
                                     r"^\s*((?:mul|mad)\.lo\.[su]32\s.*)$")
"""


def test_the_only_32_bit_product_is_the_program_ids_remainder():
    found = ptx_float_ops(WRAPPING_PRODUCTS)
    assert len(found["_gather_kernel"]) == len(found["_swap_kernel"]) == 1, found
