"""The Triton kernels compiled for NVIDIA GPUs without a GPU: a fresh interpreter without TRITON_INTERPRET
(under it, triton.jit gives interpreted functions) runs a test's script, which calls
`float_ops(kernel, signature, block, options, arch)` for each case and stores the sorted PTX
floating-point and conversion instructions in `found[name]`; `ptx_ops(kernel, signature, constexprs,
options, arch, pattern)` takes any constexprs and lists the instructions a pattern matches."""
import json
import os
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
