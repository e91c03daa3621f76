"""The recipe of the compiled kernels: sources, flags and names, in one place for the two builds that use
it. setup.py builds the extensions at install (it loads this file by path, without importing the
package); ops/backends.py rebuilds a variant at run time only for development (a source checkout
without an installed build, or another MERGE_ENGINE_CPU_ARCH), cached under a key of the sources and
flags. Standard library only: setup.py runs it before torch or the package are importable.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass

CPU_MODULE = "_cpu_kernels"  # merge_engine._cpu_kernels
CPU_TARGET = "_cpu_kernels.target.json"  # beside the CPU module: its -march and the CPU features that needs
CUDA_MODULE = "_cuda_kernels"  # merge_engine._cuda_kernels
DEFAULT_CPU_ARCH = "native"


def cpu_arch() -> str:
    """The -march of the CPU build: MERGE_ENGINE_CPU_ARCH, default native (at install: the machine
    that installs; set a portable target such as x86-64-v2 when building a wheel for other machines).
    An installed module is used whatever its -march, where this CPU has the features it was built for."""
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
    arch: str = ""  # the CPU build's -march (not in its key: a module built for any CPU runs the same code)

    @property
    def variant(self) -> str:
        """The key and the -march: one development build folder (and module name) each."""
        return f"{self.key}_{re.sub(r'[^A-Za-z0-9]', '_', self.arch)}" if self.arch else self.key


def cpu_build(csrc: str, torch_version: str, ext_suffix: str) -> Build:
    unity, arch = os.path.join(csrc, CPU_UNITY), cpu_arch()
    # the key hashes the flags with a placeholder -march: the target is checked against the CPU instead
    key = build_key([*cpu_sources(csrc), unity], cpu_cflags("any"), torch_version, ext_suffix)
    return Build(CPU_MODULE, [unity], cpu_cflags(arch) + [_key_define(key)], CPU_LDFLAGS, [], key, arch)


def cuda_build(csrc: str, torch_version: str, ext_suffix: str) -> Build:
    sources = cuda_sources(csrc)
    key = build_key(sources, CUDA_CFLAGS + NVCC_FLAGS, torch_version, ext_suffix)
    return Build(CUDA_MODULE, sources, CUDA_CFLAGS + [_key_define(key)], [], NVCC_FLAGS + [_key_define(key)], key)


# The x86 instruction-set extensions a compiler uses on its own under -march (vectorised loops, bit
# scans, fused multiply-adds), by predefined macro, with each one's /proc/cpuinfo flag. A module built
# for a CPU with one of them dies of SIGILL on a CPU without it, so a build records the ones it may use
# (CPU_TARGET) and a CPU lacking any is refused before the module loads. Extensions reached only through
# explicit intrinsics (AES, SHA, AMX...), which the kernels do not call, are left out.
ISA_MACROS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2", "__SSE4A__": "sse4a",
    "__POPCNT__": "popcnt", "__LZCNT__": "abm", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__MOVBE__": "movbe",
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__FMA4__": "fma4", "__XOP__": "xop", "__F16C__": "f16c",
    "__AVXVNNI__": "avx_vnni", "__GFNI__": "gfni", "__VAES__": "vaes", "__VPCLMULQDQ__": "vpclmulqdq",
    "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd", "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma", "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni", "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16",
}


def target_features(compiler: str, arch: str) -> list[str] | None:
    """The /proc/cpuinfo flags of the extensions a build with -march=arch may use (ISA_MACROS), from the
    compiler's predefined macros; None when the compiler does not say."""
    try:
        macros = subprocess.run([compiler, f"-march={arch}", "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    defined = {line.split()[1] for line in macros.splitlines() if line.startswith("#define ")}
    return sorted(flag for macro, flag in ISA_MACROS.items() if macro in defined)


def cpu_target(compiler: str, arch: str) -> dict:
    """The record of a CPU build for -march=arch: {"arch", "features"} (target_features)."""
    return {"arch": arch, "features": target_features(compiler, arch)}


def write_cpu_target(path: str, compiler: str, arch: str) -> None:
    with open(path, "w") as f:
        json.dump(cpu_target(compiler, arch), f)


def read_cpu_target(path: str) -> dict | None:
    """What write_cpu_target recorded ({"arch", "features"}), or None where there is no readable record."""
    try:
        with open(path) as f:
            target = json.load(f)
    except (OSError, ValueError):
        return None
    return target if isinstance(target, dict) else None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """This CPU's feature flags (Linux on x86), or None where the system does not list them."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def lacking_features(target: dict | None, flags: set[str] | None) -> list[str]:
    """The features a build's target needs that this CPU lacks (none where either is unknown)."""
    features = (target or {}).get("features")
    if flags is None or not isinstance(features, list):
        return []
    return sorted(str(f) for f in features if f not in flags)


def _key_define(key: str) -> str:
    # a bare token, stringified in the bindings: quotes would not survive the shell that ninja runs
    return f"-DMERGE_ENGINE_BUILD_KEY={key}"
