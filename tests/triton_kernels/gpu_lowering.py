"""The Triton kernels compiled for NVIDIA GPUs without a GPU: a fresh interpreter without TRITON_INTERPRET
(under it, triton.jit gives interpreted functions) runs a test's script, which calls
`float_ops(kernel, signature, block, options, arch)` for each case and stores the sorted PTX
floating-point and conversion instructions in `found[name]`; `ptx_ops(kernel, signature, constexprs,
options, arch, pattern)` takes any constexprs and lists the instructions a pattern matches. check_ieee_rounding
asserts what elementwise kernels promise."""
import json
import os
import re
import subprocess
import sys

PRELUDE = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FLOAT_OPS = r"^\s*((?:fma|add|sub|mul|div|cvt|max|min)\.[\w.]*f\d+[\w.]*)"

def ptx_ops(kernel, signature, constexprs, options, arch, pattern):
    source = ASTSource(kernel, signature=signature, constexprs=constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]
    return sorted(set(re.findall(pattern, ptx, re.M)))

def float_ops(kernel, signature, block, options, arch):
    return ptx_ops(kernel, signature, {"BLOCK": block}, options, arch, FLOAT_OPS)

found = {}
"""


def ptx_float_ops(script: str) -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = PRELUDE + script + "\nprint(json.dumps(found))\n"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


def check_ieee_rounding(found: dict[str, list[str]], float_types: str = "f32") -> None:
    """Every add, multiply and divide rounds to nearest (.rn: no fused multiply-add, an IEEE division) in one of
    float_types (a regex alternation), no instruction flushes subnormals (.ftz), narrowing conversions round to
    nearest, and the merge kernels divide as IEEE does."""
    for kernel, ops in found.items():
        arithmetic = [op for op in ops if re.match(r"(fma|add|sub|mul|div|max|min)\.", op)]
        assert arithmetic and all(re.fullmatch(rf"(add|sub|mul|div)\.rn\.({float_types})", op) for op in arithmetic), (
            kernel, ops)
        assert not [op for op in ops if ".ftz" in op], (kernel, ops)
        narrowing = [op for op in ops if re.match(r"cvt\.\w*\.?b?f16\.f32", op)]
        assert all(".rn." in op for op in narrowing), (kernel, ops)
    assert all("div.rn.f32" in ops for kernel, ops in found.items() if "merge" in kernel)
