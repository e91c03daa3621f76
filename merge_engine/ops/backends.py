"""Compiled backends of the ops: the C++ CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda) and the
Triton kernels (triton_kernels/).

setup.py builds the C++ and CUDA modules at install (merge_engine._cpu_kernels, _cuda_kernels), from
the recipe in merge_engine/kernel_build.py; each module carries the key of the sources and flags it was
built from. An installed module whose key matches is used as it is. In a source checkout (csrc/ and
setup.py beside the package), a module that is missing or stale (edited sources, another
MERGE_ENGINE_CPU_ARCH, another torch) is rebuilt on first use for development, into
<checkout>/build/kernels/<key>_<arch>/: one folder per variant, so checkouts and variants never share a build,
and a lock that dies with its process, so no run waits on a killed build. An installed package never
compiles at run time: a missing or mismatched module gives one warning naming the fix, and the PyTorch
references run instead.

Device kernels are registered for the torch.library ops at import; each one calls its compiled
backend when that backend loads and the inputs are ones it serves, and the PyTorch reference
otherwise. MERGE_ENGINE_KERNELS=0 turns the compiled backends off; MERGE_ENGINE_GPU_BACKEND chooses
the GPU one (gpu_backend).

    python -m merge_engine.build_kernels    # build (or check) the extensions ahead of time
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import importlib.util
import logging
import os
import sysconfig
import threading
import warnings

import torch

from merge_engine import kernel_build, runtime

log = logging.getLogger("merge_engine")

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REINSTALL = "reinstall with `pip install --no-build-isolation --force-reinstall <merge_engine source>` after installing torch"


def loaded_once(load):
    """functools.cache for a backend's loader, whose first calls from several threads at once run it once, the others
    waiting for its result: torch's loader, building the kernels in a source checkout, builds one more copy (minutes)
    for each call made meanwhile."""
    cached = functools.cache(load)
    lock = threading.Lock()

    @functools.wraps(load)
    def loaded(*args):
        with lock:
            return cached(*args)
    loaded.cache_clear = cached.cache_clear
    return loaded


def kernels_enabled() -> bool:
    return os.environ.get("MERGE_ENGINE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def source_checkout() -> str | None:
    """The checkout folder when the package runs from its sources (editable install, PYTHONPATH), else None."""
    root = os.path.dirname(PACKAGE_DIR)
    return root if all(os.path.exists(os.path.join(root, f)) for f in ("csrc", "setup.py")) else None


def csrc_dir() -> str:
    """csrc/ beside the package (source checkout) or inside it (installed: package data)."""
    for candidate in (os.path.join(os.path.dirname(PACKAGE_DIR), "csrc"), os.path.join(PACKAGE_DIR, "csrc")):
        if os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError("merge_engine's csrc/ sources are not installed")


@loaded_once
def cpu_extension():
    """The compiled CPU module, or None (with one warning) when it is unavailable."""
    if not kernels_enabled():
        return None
    module = _compiled("CPU", kernel_build.cpu_build)
    if module is not None:  # fresh huge pages cost more than they save where the host takes them back
        module.set_huge_page_outputs(not runtime.host_reclaims_free_huge_pages())
    return module


@loaded_once
def cuda_extension():
    """The compiled CUDA module, or None with one warning (None, silently, without a GPU)."""
    if not kernels_enabled() or not torch.cuda.is_available():
        return None
    return _compiled("CUDA", kernel_build.cuda_build)


def _compiled(kind: str, recipe):
    """The installed module of this recipe when it is the build its sources make; else, in a source
    checkout, a development build; else None. Every failure: one warning, and None."""
    try:
        build = recipe(csrc_dir(), torch.__version__, sysconfig.get_config_var("EXT_SUFFIX"))
        installed, problem = _installed(build)
        if installed is not None:
            return installed
        if source_checkout() is None:
            raise RuntimeError(f"{problem}; {REINSTALL}")
        return _development_build(build)
    except Exception as e:  # any build or load failure: fall back, loudly but once
        warnings.warn(f"merge_engine: compiled {kind} kernels unavailable ({type(e).__name__}: {e}); "
                      "using the PyTorch reference ops", RuntimeWarning, stacklevel=3)
        return None


def _installed(build: kernel_build.Build):
    """(module, None) when the installed module matches the build and this CPU runs it, else (None, why not)."""
    name = f"merge_engine.{build.module}"
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None, f"{name} is not installed"
    if build.arch:  # the CPU module: checked before it loads, as loading may already run its instructions
        problem = _cpu_target_problem(name, os.path.join(os.path.dirname(spec.origin), kernel_build.CPU_TARGET), build)
        if problem:
            return None, problem
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        return None, f"{name} does not load ({e})"
    if getattr(module, "build_key", None) != build.key:
        return None, (f"{name} was built from other sources, flags or torch than "
                      f"these (key {getattr(module, 'build_key', None)}, expected {build.key})")
    return module, None


def _cpu_target_problem(name: str, record: str, build: kernel_build.Build) -> str | None:
    """Why the CPU module built as `record` says must not load here: this CPU lacks features it was
    built for, or (in a source checkout, where MERGE_ENGINE_CPU_ARCH picks the development build) it was
    built for another -march. None where it may load (an unreadable record: an older build, unchecked)."""
    target = kernel_build.read_cpu_target(record)
    lacking = kernel_build.lacking_features(target, kernel_build.cpu_flags())
    if lacking:
        return (f"{name} was built with -march={target.get('arch')} for a CPU with {', '.join(lacking)}, which this "
                "CPU lacks (a build made elsewhere: build on this machine, or build for other machines with "
                "MERGE_ENGINE_CPU_ARCH=x86-64-v2)")
    arch = (target or {}).get("arch", kernel_build.DEFAULT_CPU_ARCH)
    if source_checkout() is not None and arch != build.arch:
        return f"{name} was built with -march={arch}, not the MERGE_ENGINE_CPU_ARCH={build.arch} asked for"
    return None


def _development_build(build: kernel_build.Build):
    """Build (or load the cached build of) this recipe with ninja, in <checkout>/build/kernels/<variant>/."""
    from torch.utils.cpp_extension import load
    if build.arch:
        target = kernel_build.cpu_target(os.environ.get("CXX", "c++"), build.arch)  # the compiler load() runs
        lacking = kernel_build.lacking_features(target, kernel_build.cpu_flags())
        if lacking:
            raise RuntimeError(f"MERGE_ENGINE_CPU_ARCH={build.arch} builds for a CPU with {', '.join(lacking)}, "
                               "which this CPU lacks")
    folder = os.path.join(source_checkout(), "build", "kernels", build.variant)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "merge_engine.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        # we hold the only lock on this folder, so a `lock` file of torch's own is a killed build's
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "lock"))
        if not any(name.endswith(".so") for name in os.listdir(folder)):
            log.info("building merge_engine %s for development (a few minutes)", build.module)
        return load(name=f"merge_engine{build.module}_{build.variant}", sources=build.sources,
                    extra_cflags=build.cflags, extra_cuda_cflags=build.nvcc_flags or None,
                    extra_ldflags=build.ldflags, build_directory=folder, verbose=False)


def gpu_backend(family: str = "task_vectors"):
    """The GPU backend of an op family for CUDA tensors, chosen by MERGE_ENGINE_GPU_BACKEND:
    `auto` (default: the CUDA module if it loads, else the family's Triton module), `cuda`, `triton`
    or `reference` (None: the PyTorch references)."""
    choice = gpu_backend_choice()
    if choice == "reference":
        return None
    if choice == "triton":
        return triton_backend(family)
    if choice == "cuda":
        return cuda_extension()
    return cuda_extension() or triton_backend(family)


GPU_BACKENDS = ("auto", "cuda", "triton", "reference")


def gpu_backend_choice() -> str:
    choice = os.environ.get("MERGE_ENGINE_GPU_BACKEND", "auto").lower()
    if choice not in GPU_BACKENDS:
        raise ValueError(f"MERGE_ENGINE_GPU_BACKEND={choice!r}: expected one of {', '.join(GPU_BACKENDS)}")
    return choice


@loaded_once
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
