"""The Triton Gram kernel (triton_kernels/gram.py): an interpreter quirk it works around, its argument
checks, its dispatch and its GPU lowering. Its values, against an fp64 reference of the kept rows at
its tile thresholds, are tested with the other backends' in tests/kernels/test_gram.py.

The GPU lowering is checked without a GPU too: compiled for sm_80 and sm_90, fp32 must multiply with
fp32 fma (input_precision="ieee": no TF32 conversion or tensor-core instruction), bf16 and fp16 on
tensor cores with fp32 accumulators (mma.sync on sm_80, wgmma on sm_90), and nothing flushes
subnormals to zero.
"""
import os
import re

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or the interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from merge_engine.ops import backends  # noqa: E402
from merge_engine.triton_kernels import gram as tg  # noqa: E402
from tests.triton_kernels.gpu_lowering import ptx_float_ops  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.skipif(DEVICE != "cpu", reason="a property of the Triton interpreter")
def test_the_interpreter_needs_bf16_widened():
    """Why the kernel widens bf16 tiles under the interpreter: its tl.dot multiplies their uint16
    storage. When this fails, Triton has fixed that and WIDEN_BF16 can go."""
    x = torch.full((32, 2), 2.0, dtype=torch.bfloat16)
    results = {}
    for widen in (False, True):
        gram = torch.zeros(2, 2)
        tg._gram_kernel[(1,)](gram, x, None, 32, 2, HAS_MASK=False, WIDEN_BF16=widen, BLOCK=tg.BLOCK,
                              BLOCK_T=tg.BLOCK_T)
        results[widen] = float(gram[0, 0])
    assert results == {True: 128.0, False: 32 * float(0x4000) ** 2}


def test_bad_arguments_are_rejected():
    x, gram = torch.ones(4, 7, device=DEVICE), torch.zeros(7, 7, device=DEVICE)
    for args, message in [
        ((torch.zeros(7, 7, device=DEVICE).t(), x, None), "gram must be a contiguous float32 \\[d, d\\]"),
        ((gram.double(), x, None), "gram must be a contiguous float32"),
        ((gram, x.double(), None), "float32, bfloat16 or float16 \\[T, d\\]"),
        ((gram, x.reshape(2, 2, 7), None), "\\[T, d\\] tensor"),
        ((gram, torch.ones(4, 6, device=DEVICE), None), "does not match activations"),
        ((gram, x.to("meta"), None), "does not match activations"),
        ((gram, x, torch.ones(4, 1, dtype=torch.bool, device=DEVICE)), "mask must be a bool \\[T\\] tensor"),
        ((gram, x, torch.ones(4, device=DEVICE)), "mask must be a bool \\[T\\] tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            tg.accumulate_gram(*args)


def test_backend_is_the_triton_module(monkeypatch):
    monkeypatch.setenv("MERGE_ENGINE_KERNELS", "1")
    backends.triton_backend.cache_clear()
    try:
        assert backends.triton_backend("gram") is tg
    finally:
        backends.triton_backend.cache_clear()


# Per (arch, dtype): the PTX multiply-add, conversion and matrix instructions (gpu_lowering.py).
COMPILE_FOR_GPUS = r"""
from merge_engine.triton_kernels import gram as tg
pattern = r"^\s*((?:wgmma|mma|fma|add|sub|mul|cvt)\.[\w.]*f\d+[\w.]*)"
for arch in (80, 90):
    for dtype in ("fp32", "bf16", "fp16"):
        signature = dict(gram_ptr="*fp32", x_ptr=f"*{dtype}", mask_ptr="*u8", T="i32", d="i32", HAS_MASK="constexpr",
                         WIDEN_BF16="constexpr", BLOCK="constexpr", BLOCK_T="constexpr")
        constexprs = dict(HAS_MASK=True, WIDEN_BF16=False, BLOCK=tg.BLOCK, BLOCK_T=tg.BLOCK_T)
        found[f"sm_{arch} {dtype}"] = ptx_ops(tg._gram_kernel, signature, constexprs, tg._OPTIONS, arch, pattern)
"""


def test_kernel_lowers_to_fp32_fma_and_tensor_cores_for_sm80_and_sm90():
    found = ptx_float_ops(COMPILE_FOR_GPUS)
    assert len(found) == 6
    for case, ops in found.items():
        assert not [op for op in ops if ".ftz" in op], (case, ops)
        matrix = [op for op in ops if re.match(r"w?g?mma\.", op)]
        if case.endswith("fp32"):
            assert "fma.rn.f32" in ops and not matrix and not [op for op in ops if "tf32" in op], (case, ops)
            continue
        dtype = case.split()[1].replace("fp16", "f16")
        if case.startswith("sm_80"):
            want = rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{dtype}\.{dtype}\.f32"
        else:
            want = rf"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.{dtype}\.{dtype}"
        assert matrix and all(re.fullmatch(want, op) for op in matrix), (case, ops)
        assert not [op for op in ops if op.startswith("fma.")], (case, ops)


# Gram offsets are row * d + col: past 2**31 from d = 46341 (a 405B model's down_proj input has d = 53248), so
# none of the kernel's integer products may wrap at 32 bits. Compiled with the int32 sizes a launch passes.
WRAPPING_PRODUCTS = r"""
from merge_engine.triton_kernels import gram as tg
signature = dict(gram_ptr="*fp32", x_ptr="*bf16", mask_ptr="*u8", T="i32", d="i32", HAS_MASK="constexpr",
                 WIDEN_BF16="constexpr", BLOCK="constexpr", BLOCK_T="constexpr")
constexprs = dict(HAS_MASK=True, WIDEN_BF16=False, BLOCK=tg.BLOCK, BLOCK_T=tg.BLOCK_T)
found["sm_90"] = ptx_ops(tg._gram_kernel, signature, constexprs, tg._OPTIONS, 90, r"^\s*((?:mul|mad)\.lo\.[su]32)")
"""


def test_kernel_offsets_do_not_wrap_at_32_bits():
    assert ptx_float_ops(WRAPPING_PRODUCTS) == {"sm_90": []}
