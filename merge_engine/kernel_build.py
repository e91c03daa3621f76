"""The recipe of the compiled kernels: sources, flags and names, in one place for the two builds that use
it. setup.py builds the extensions at install (it loads this file by path, without importing the
package); ops/backends.py rebuilds a variant at run time only for development (a source checkout
without an installed build, or another MERGE_ENGINE_CPU_ARCH), cached under a key of the sources and
flags. Standard library only: setup.py runs it before torch or the package are importable.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass

CPU_MODULE = "_cpu_kernels"  # merge_engine._cpu_kernels
CUDA_MODULE = "_cuda_kernels"  # merge_engine._cuda_kernels
DEFAULT_CPU_ARCH = "native"


def cpu_arch() -> str:
    """The -march of the CPU build: MERGE_ENGINE_CPU_ARCH, default native (at install: the machine
    that installs; set a portable target such as x86-64-v2 when building a wheel for other machines)."""
    arch = os.environ.get("MERGE_ENGINE_CPU_ARCH", DEFAULT_CPU_ARCH)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", arch):
        raise ValueError(f"MERGE_ENGINE_CPU_ARCH={arch!r} is not a -march name")
    return arch


CPU_UNITY = "cpu_kernels.cpp"  # in csrc/: includes every csrc/cpu/*.cpp, compiled as one translation unit


def cpu_sources(csrc: str) -> list[str]:
    """The CPU kernels' files by algorithm (what the build key hashes; cpu_build compiles them through CPU_UNITY)."""
    return sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def cuda_sources(csrc: str) -> list[str]:
    return sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp")) + glob.glob(os.path.join(csrc, "cuda", "*.cu")))


def cpu_cflags(arch: str) -> list[str]:
    # -ffp-contract=off: no fused multiply-add, which would round differently from torch;
    # -fno-trapping-math: lets loops with a guarded division vectorise (results are unchanged);
    # hidden visibility, no semantic interposition: the kernels' functions are this module's own, so the
    # compiler may inline them across calls as freely as when they shared one file (the split into files
    # by algorithm cost the TIES select 5-10% without it; bench/RESULTS.md).
    return ["-O3", f"-march={arch}", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp",
            "-fvisibility=hidden", "-fno-semantic-interposition"]


CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]
# -fmad=false: no fused multiply-add, which would round differently from torch (like -ffp-contract=off
# on the CPU); never --use_fast_math (IEEE division and rounding needed).
NVCC_FLAGS = ["-O3", "-fmad=false"]


def build_key(sources: list[str], flags: list[str], torch_version: str, ext_suffix: str) -> str:
    """A short hash of the sources' bytes (and the headers beside them), the flags, the torch version and
    the Python extension suffix: two builds with the same key are the same build. The key is compiled
    into the module (key_define), so a loaded module says whether it is the build its sources make."""
    digest = hashlib.sha256()
    headers = sorted({h for s in sources for d in (os.path.dirname(s), os.path.dirname(os.path.dirname(s)))
                      for h in glob.glob(os.path.join(d, "*.h")) + glob.glob(os.path.join(d, "*.cuh"))})
    for path in sorted(sources) + headers:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read())
    for item in (*flags, torch_version, ext_suffix):
        digest.update(item.encode() + b"\0")
    return "k" + digest.hexdigest()[:16]  # an identifier: see _key_define


@dataclass(frozen=True)
class Build:
    module: str  # CPU_MODULE or CUDA_MODULE
    sources: list[str]
    cflags: list[str]  # the build key's define included
    ldflags: list[str]
    nvcc_flags: list[str]  # empty for the CPU build
    key: str


def cpu_build(csrc: str, torch_version: str, ext_suffix: str) -> Build:
    unity, flags = os.path.join(csrc, CPU_UNITY), cpu_cflags(cpu_arch())
    key = build_key([*cpu_sources(csrc), unity], flags, torch_version, ext_suffix)
    return Build(CPU_MODULE, [unity], flags + [_key_define(key)], CPU_LDFLAGS, [], key)


def cuda_build(csrc: str, torch_version: str, ext_suffix: str) -> Build:
    sources = cuda_sources(csrc)
    key = build_key(sources, CUDA_CFLAGS + NVCC_FLAGS, torch_version, ext_suffix)
    return Build(CUDA_MODULE, sources, CUDA_CFLAGS + [_key_define(key)], [], NVCC_FLAGS + [_key_define(key)], key)


def _key_define(key: str) -> str:
    # a bare token, stringified in the bindings: quotes would not survive the shell that ninja runs
    return f"-DMERGE_ENGINE_BUILD_KEY={key}"
