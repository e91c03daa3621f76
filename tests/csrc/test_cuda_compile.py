"""The CUDA kernels (csrc/cuda) compile for sm_80 and sm_90, on machines without a GPU.

What is compiled, and why it is a real check:
- The sources and extra flags are the CUDA build's (merge_engine/kernel_build.py: setup.py and the
  development build use the same recipe), plus the flags torch's builder itself adds (-DTORCH_EXTENSION_NAME, torch's COMMON_NVCC_FLAGS such as
  -D__CUDA_NO_HALF_OPERATORS__, -fPIC), so a stale source list or flag breaks this test too.
- each .cu source (every .cu file of csrc/cuda: the families' entry points task_vectors.cu, fisher.cu, gram.cu,
  permute.cu, and the task-vector family's algorithms) goes through nvcc for both architectures in one call
  (-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90, -std=c++17): the device
  code is compiled down to SASS by ptxas for each architecture, and the host half by the host compiler.
  C++17 is the oldest standard the sources support; load() uses torch's default (C++20 for torch
  2.13), which they also compile with.
  bindings.cpp goes through the host compiler (c++, or $CXX); all compile concurrently.
- Headers are torch's own (torch.utils.cpp_extension.include_paths()) and the CUDA toolkit's; no
  stubs. The kernels use only c10/cuda headers (c10::cuda::getCurrentCUDAStream, CUDAGuard,
  C10_CUDA_KERNEL_LAUNCH_CHECK), which CPU wheels of torch ship too; ATen/cuda/CUDAContext.h is
  avoided because it includes cuBLAS/cuSPARSE/cuSOLVER headers that a bare toolkit may lack.
  A CPU wheel lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h, whose only content is
  `#define C10_CUDA_BUILD_SHARED_LIBS` (used for Windows dllexport only); when it is missing we
  define C10_CUDA_NO_CMAKE_CONFIGURE_FILE, torch's own switch for skipping it. Nothing else differs
  from a build against a CUDA wheel.
- Then: every merge_engine:: function bindings.o or a .cu object needs is defined by a .cu object, and
  each .cu object defines some that bindings.o or another object needs (nm), so the declarations in
  bindings.cpp and the internal headers match the definitions and every source is used; and the PTX nvcc kept for each source has no fma instruction (a contracted multiply-add
  would round differently from torch; see -fmad=false) and no .ftz one (flushing subnormals to zero
  would too; Fisher values reach them); and gram.cu's PTX sums bf16 and fp16 products on tensor
  cores with fp32 accumulators (wmma.mma; its fp32 path is the fma-free multiply and add above).
Nothing is linked against libtorch_cuda (absent from CPU wheels), and nothing runs.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from merge_engine import kernel_build
from merge_engine.ops import backends

ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
TIMEOUT_S = 1200


def build_arguments():
    """The CUDA build's name, sources and flags, from the recipe that setup.py and the development
    build both use (merge_engine/kernel_build.py)."""
    build = kernel_build.cuda_build(backends.csrc_dir(), torch.__version__, sysconfig.get_config_var("EXT_SUFFIX"))
    return {"name": build.module, "sources": build.sources, "extra_cflags": build.cflags,
            "extra_cuda_cflags": build.nvcc_flags}


def torch_include_flags():
    """torch's include paths and Python's (nvcc adds the toolkit's own include directory)."""
    incs = list(cpp_extension.include_paths()) + [sysconfig.get_path("include")]
    flags = []
    for inc in incs:
        flags += ["-isystem", inc]
    return flags


def run_concurrently(jobs, cwd):
    """Runs {what: command} at once; fails with the output of the first that fails or times out."""
    procs = {what: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
             for what, cmd in jobs.items()}
    for what, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"compilation took longer than {TIMEOUT_S} s")
        if proc.returncode != 0:
            sys.stderr.write(err)
        assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{out}\n{err}"


def merge_engine_symbols(nm, obj, *flags):
    """The merge_engine:: functions nm lists; a function template's demangled name starts with its return
    type (`void merge_engine::f<float>(...)`), which may not name a template of another namespace."""
    text = subprocess.run([nm, "-C", *flags, str(obj)], capture_output=True, text=True, check=True).stdout
    names = (re.match(r"\s*(?:[0-9a-fA-F]+\s+)?[A-Za-z]\s+(.*)$", line) for line in text.splitlines())
    return {m.group(1) for m in names
            if m and re.match(r"(?:[^<(]*\s)?merge_engine::", m.group(1).split("(")[0])}


def check_bindings(nm, bindings_obj, cu_objs):
    """Every merge_engine:: function bindings.o or a .cu object needs is defined by a .cu object, and each
    .cu object defines some that bindings.o or another object needs (the families' entry points are bound,
    the algorithms' files are called from them)."""
    bound = merge_engine_symbols(nm, bindings_obj, "-u")
    assert bound, "bindings.o references no merge_engine:: function"
    needed = {obj.name: merge_engine_symbols(nm, obj, "-u") for obj in cu_objs}
    defined = {obj.name: merge_engine_symbols(nm, obj, "--defined-only") for obj in cu_objs}
    missing = bound - set().union(*defined.values())
    assert not missing, f"declared in bindings.cpp but not defined in {sorted(defined)}: {missing}"
    for name, symbols in needed.items():
        missing = symbols - set().union(*defined.values())
        assert not missing, f"needed by {name} but not defined in {sorted(defined)}: {missing}"
    for name, symbols in defined.items():
        users = bound.union(*(needed[other] for other in needed if other != name))
        assert users & symbols, f"neither bindings.cpp nor another source calls a function of {name}"


def check_device_code(keep):
    """SASS for both architectures, and no fused multiply-add (-fmad=false) nor flush to zero (Fisher
    values reach subnormals) anywhere in the PTX nvcc kept in this folder."""
    for arch in ("80", "90"):
        cubins = [c for pattern in (f"*compute_{arch}*.cubin", f"*sm_{arch}*.cubin") for c in keep.glob(pattern)]
        assert any(c.stat().st_size > 0 for c in cubins), f"no sm_{arch} cubin among {sorted(os.listdir(keep))}"
    ptx = sorted(keep.glob("*.ptx"))
    archs = {m.group(1) for m in (re.search(r"compute_(\d+)", p.name) for p in ptx) if m}
    assert archs >= {"80", "90"}, [p.name for p in ptx]
    for p in ptx:
        lines = [line.strip() for line in p.read_text().splitlines()]
        fma = [line for line in lines if re.match(r"fma\.", line)]
        assert not fma, f"{p.name} contains fused multiply-adds, e.g. {fma[:3]}"
        ftz = [line for line in lines if re.search(r"\.ftz\b", line)]
        assert not ftz, f"{p.name} flushes subnormals to zero, e.g. {ftz[:3]}"


def check_gram_tensor_cores(keep):
    """gram.cu's bf16 and fp16 kernels multiply on tensor cores, fp32 accumulators, for both
    architectures (PTX names no input type for f16: .f32.f32 is f16 inputs, f32 output and addend)."""
    ptx = sorted(keep.glob("*.ptx"))
    assert ptx, "no PTX kept for gram.cu"
    for p in ptx:
        mma = set(re.findall(r"^\s*(wmma\.mma\.[\w.]+)", p.read_text(), re.M))
        assert mma == {"wmma.mma.sync.aligned.col.row.m16n16k16.f32.bf16.bf16.f32",
                       "wmma.mma.sync.aligned.col.row.m16n16k16.f32.f32"}, (p.name, mma)


@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no host C++ compiler ({cxx})")
    torch_include = cpp_extension.include_paths()[0]
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("this torch install ships no c10/cuda headers")

    kwargs = build_arguments()
    sources = kwargs["sources"]
    cu = [s for s in sources if s.endswith(".cu")]
    cpp = [s for s in sources if s.endswith(".cpp")]
    cuda_dir = os.path.join(backends.csrc_dir(), "cuda")
    assert sources == sorted(os.path.join(cuda_dir, f) for f in os.listdir(cuda_dir) if f.endswith((".cpp", ".cu")))
    assert {"fisher.cu", "gram.cu", "permute.cu", "task_vectors.cu"} <= {os.path.basename(s) for s in cu}, sources
    assert [os.path.basename(s) for s in cpp] == ["bindings.cpp"], sources
    assert "--use_fast_math" not in kwargs.get("extra_cuda_cflags", []) and "-fmad=false" in kwargs["extra_cuda_cflags"]

    name = kwargs["name"]
    defines = [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU wheel: see the module docstring
    includes = torch_include_flags()
    stems = [os.path.splitext(os.path.basename(s))[0] for s in cu]
    keep = {stem: tmp_path / "keep" / stem for stem in stems}  # one folder each: no clash of kept files
    jobs = {}
    for src, stem in zip(cu, stems):
        keep[stem].mkdir(parents=True)
        jobs[f"nvcc {stem}.cu"] = (
            [nvcc, "-c", src, "-o", str(tmp_path / f"{stem}.o"), "-std=c++17", "--compiler-options", "-fPIC",
             f"--threads={max(2, min(4, os.cpu_count() or 2))}", "--keep", f"--keep-dir={keep[stem]}"]
            + ARCHS + defines + cpp_extension.COMMON_NVCC_FLAGS + kwargs.get("extra_cuda_cflags", []) + includes)
    jobs["c++ bindings.cpp"] = ([cxx, "-c", cpp[0], "-o", str(tmp_path / "bindings.o"), "-std=c++17", "-fPIC"]
                                + defines + kwargs.get("extra_cflags", []) + includes)
    for what, cmd in jobs.items():
        print(f"{what} command:", " ".join(cmd))
    run_concurrently(jobs, tmp_path)

    nm = shutil.which("nm")
    if nm is not None:
        check_bindings(nm, tmp_path / "bindings.o", [tmp_path / f"{stem}.o" for stem in stems])
    for stem in stems:
        check_device_code(keep[stem])
    check_gram_tensor_cores(keep["gram"])


@pytest.mark.slow
def test_gram_tensor_core_choice_follows_the_code_the_device_runs(tmp_path):
    """A build for architectures below sm_80 only (TORCH_CUDA_ARCH_LIST=7.5+PTX) runs on an sm_80+ device through
    its compute_75 PTX, where gram_wmma_kernel's body is __trap(): the host must choose the kernel by the PTX
    version of the code the device loads (cudaFuncGetAttributes), not by the device's compute capability."""
    nvcc, nm = shutil.which("nvcc"), shutil.which("nm")
    if nvcc is None or nm is None:
        pytest.skip("nvcc or nm is not on PATH: the CUDA sources cannot be compiled and inspected here")
    torch_include = cpp_extension.include_paths()[0]
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("this torch install ships no c10/cuda headers")
    kwargs = build_arguments()
    (gram,) = [s for s in kwargs["sources"] if os.path.basename(s) == "gram.cu"]
    defines = [f"-DTORCH_EXTENSION_NAME={kwargs['name']}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    run_concurrently({"nvcc gram.cu (compute_75 PTX)": (
        [nvcc, "-c", gram, "-o", str(tmp_path / "gram.o"), "-std=c++17", "--compiler-options", "-fPIC", "--keep",
         f"--keep-dir={tmp_path}", "-gencode", "arch=compute_75,code=compute_75"]
        + defines + cpp_extension.COMMON_NVCC_FLAGS + kwargs["extra_cuda_cflags"] + torch_include_flags())}, tmp_path)
    (ptx,) = tmp_path.glob("*.ptx")
    assert "trap;" in ptx.read_text() and "wmma.mma" not in ptx.read_text(), "compute_75 PTX: the wmma kernel traps"
    calls = subprocess.run([nm, "-u", str(tmp_path / "gram.o")], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bcudaFuncGetAttributes\b", calls), "gram.cu does not ask which code its wmma kernel runs"
