"""Compiled backends of the ops: the C++ CPU extension (csrc/cpu), built with ninja on first use and
cached by torch.utils.cpp_extension (TORCH_EXTENSIONS_DIR); later issues add CUDA and Triton.

Device kernels are registered for the torch.library ops at import; each one calls its compiled
backend when that backend loads and the inputs are ones it serves, and the PyTorch reference
otherwise. A backend that fails to build or load gives one warning and the references take over.
MERGE_ENGINE_KERNELS=0 turns the compiled backends off. MERGE_ENGINE_CPU_ARCH (default native) is the
-march of the CPU build: a portable target such as x86-64-v2 builds the kernels' plain C++ lanes instead
of AVX2, as non-x86 machines get them (tools/test.sh tests both).

    python -m merge_engine.build_kernels    # build (or check) the extension ahead of time
"""
from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import logging
import os
import threading
import warnings
from typing import Callable, Iterator

import torch

log = logging.getLogger("merge_engine")

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernels_enabled() -> bool:
    return os.environ.get("MERGE_ENGINE_KERNELS", "1") not in ("0", "false", "no")


def csrc_dir() -> str:
    """csrc/ beside the package (source checkout, editable install) or inside it (wheel)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError("merge_engine's csrc/ sources are not installed")


def kernel_sources(src: str, backend: str) -> list[str]:
    """The sources of a compiled backend: every .cpp (CPU) or .cpp and .cu (CUDA) file in csrc/<backend>,
    sorted, so that a new file needs no edit here (setup.py builds by the same rule)."""
    patterns = ("*.cpp",) if backend == "cpu" else ("*.cpp", "*.cu")
    return sorted(f for pattern in patterns for f in glob.glob(os.path.join(src, backend, pattern)))


def cpu_arch() -> str:
    """The -march of the CPU build (MERGE_ENGINE_CPU_ARCH, default native)."""
    arch = os.environ.get("MERGE_ENGINE_CPU_ARCH", "native")
    if not arch.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"MERGE_ENGINE_CPU_ARCH={arch!r} is not a -march name")
    return arch


@functools.cache
def cpu_extension():
    """The compiled CPU module, or None (with one warning) when it cannot be built or loaded."""
    if not kernels_enabled():
        return None
    try:
        from torch.utils.cpp_extension import load
        src = csrc_dir()
        log.info("loading merge_engine CPU kernels (the first build takes about a minute)")
        arch = cpu_arch()
        # -ffp-contract=off: no fused multiply-add, which would round differently from torch;
        # -fno-trapping-math: lets loops with a guarded division vectorise (results are unchanged).
        return load(name="merge_engine_cpu" if arch == "native" else "merge_engine_cpu_" + arch.replace("-", "_"),
                    sources=kernel_sources(src, "cpu"),
                    extra_cflags=["-O3", f"-march={arch}", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as e:  # any build or load failure: fall back, loudly but once
        warnings.warn(f"merge_engine: compiled CPU kernels unavailable ({type(e).__name__}: {e}); "
                      "using the PyTorch reference ops", RuntimeWarning, stacklevel=2)
        return None


def gpu_backend(family: str = "task_vectors"):
    """The GPU backend of an op family for CUDA tensors: the CUDA extension if it loads, else the
    family's Triton module (merge_engine.triton_kernels.<family>), else None."""
    return cuda_extension() or triton_backend(family)


@functools.cache
def cuda_extension():
    """The compiled CUDA module (csrc/cuda), or None with one warning (None, silently, without a GPU)."""
    if not kernels_enabled() or not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import load
        src = csrc_dir()
        log.info("loading merge_engine CUDA kernels (the first build takes a few minutes)")
        # -fmad=false: no fused multiply-add, which would round differently from torch (like
        # -ffp-contract=off on the CPU); never --use_fast_math (IEEE division and rounding needed).
        return load(name="merge_engine_cuda",
                    sources=kernel_sources(src, "cuda"),
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-fmad=false"], verbose=False)
    except Exception as e:  # any build or load failure: fall back, loudly but once
        warnings.warn(f"merge_engine: compiled CUDA kernels unavailable ({type(e).__name__}: {e}); "
                      "using the next GPU backend or the PyTorch reference ops", RuntimeWarning, stacklevel=2)
        return None


@functools.cache
def triton_backend(family: str = "task_vectors"):
    """The Triton module of an op family (merge_engine.triton_kernels.<family>: the compiled modules'
    functions of that family, with its declared limits), or None: kernels turned off, or Triton
    unavailable (one warning)."""
    if not kernels_enabled():
        return None
    try:
        return importlib.import_module(f"merge_engine.triton_kernels.{family}")  # imports triton
    except Exception as e:  # triton missing or broken: fall back, loudly but once
        warnings.warn(f"merge_engine: Triton kernels unavailable ({type(e).__name__}: {e}); "
                      "using the PyTorch reference ops", RuntimeWarning, stacklevel=2)
        return None


def served_by_kernels(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return all(t.dtype == first.dtype and t.dtype in KERNEL_DTYPES and t.is_contiguous() for t in tensors)


_outputs = threading.local()


@contextlib.contextmanager
def output_buffers(take: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]) -> Iterator[None]:
    """Within the block, on this thread, the CPU ops that can write into a caller's buffer
    (merge_task_vectors, fisher_merge, weighted_sum, slerp) take their output from take(shape, dtype), a
    contiguous CPU tensor that no input shares, instead of fresh memory. The engine passes its buffer
    pool: the kernel zeroes every page of fresh memory on first touch, 14% of a 1.1B TIES merge's CPU
    time when the outputs were fresh."""
    previous = getattr(_outputs, "take", None)
    _outputs.take = take
    try:
        yield
    finally:
        _outputs.take = previous


def output_like(x: torch.Tensor) -> torch.Tensor | None:
    """A buffer for an output of x's shape and dtype from output_buffers' take, or None (allocate one)."""
    take = getattr(_outputs, "take", None)
    return take(tuple(x.shape), x.dtype) if take is not None and x.device.type == "cpu" else None


def output_or_empty_like(x: torch.Tensor) -> torch.Tensor:
    """output_like(x), or a fresh tensor of x's shape and dtype when no buffer is offered."""
    out = output_like(x)
    return torch.empty_like(x) if out is None else out
