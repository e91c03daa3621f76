"""Builds the compiled kernels at install, as the field's torch extensions do (torch.utils.cpp_extension's
BuildExtension, with ninja): the C++ CPU kernels always, the CUDA kernels where torch is a CUDA build and
a CUDA toolkit is found. Metadata lives in pyproject.toml; the recipe in merge_engine/kernel_build.py.

The kernels link against the torch they are built with, so build them against the torch you run:
    pip install torch==...  then  pip install --no-build-isolation .
Without torch in the build environment (pip's default isolated build) the package installs without
compiled kernels and says so; it then runs on the PyTorch references, with one warning.
MERGE_ENGINE_BUILD_KERNELS=0 skips the build; MERGE_ENGINE_BUILD_CUDA=0|1 forces the CUDA part off or on;
MERGE_ENGINE_CPU_ARCH (default native) is the -march of the CPU build; beside the module, build_ext records
that -march and the CPU features it needs (kernel_build.CPU_TARGET), so that a CPU without them is refused
at run time (one warning) instead of dying of an illegal instruction.
"""
import importlib.util
import os
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative to the project folder, where pip runs this file: setuptools wants relative paths


def load_recipe():
    spec = importlib.util.spec_from_file_location("kernel_build", os.path.join(HERE, "merge_engine", "kernel_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def wants_cuda(torch, cpp_extension) -> bool:
    setting = os.environ.get("MERGE_ENGINE_BUILD_CUDA", "auto")
    if setting in ("0", "1"):
        return setting == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


# (safetensors files are read and written by merge_engine.io itself, with O_DIRECT and strict header checks: the
# library is a test and bench dependency, the reference our header checks are compared with)
DEPENDENCIES = ["torch>=2.4", "pyyaml>=6", "tqdm>=4.60",
                "numpy>=1.22"]  # numpy: torch's CPU wheels do not bring it, and torch warns on every run without it


def extensions() -> dict:
    if os.environ.get("MERGE_ENGINE_BUILD_KERNELS", "1") == "0" or "sdist" in sys.argv[1:]:
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("merge_engine: torch is not importable in this build environment, so the compiled kernels are "
              "not built (the package will run on the PyTorch references). To build them: pip install torch, "
              "then pip install --no-build-isolation .", file=sys.stderr)
        return {}
    recipe = load_recipe()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    cpu = recipe.cpu_build(CSRC, torch.__version__, suffix)
    modules = [cpp_extension.CppExtension(f"merge_engine.{cpu.module}", cpu.sources,
                                          extra_compile_args=cpu.cflags, extra_link_args=cpu.ldflags)]
    if wants_cuda(torch, cpp_extension):
        cuda = recipe.cuda_build(CSRC, torch.__version__, suffix)
        modules.append(cpp_extension.CUDAExtension(f"merge_engine.{cuda.module}", cuda.sources,
                                                   extra_compile_args={"cxx": cuda.cflags, "nvcc": cuda.nvcc_flags}))
    # the compiled modules load only with the torch they were built against (their build key holds its version)
    pinned = [f"torch=={torch.__version__}", *DEPENDENCIES[1:]]  # local label included: +cpu, +cu130 builds differ
    build_ext = optional_build(cpp_extension.BuildExtension, recipe, cpu.arch)
    return {"ext_modules": modules, "install_requires": pinned, "cmdclass": {"build_ext": build_ext}}


def optional_build(base, recipe, arch: str):
    """build_ext that never fails the install: a kernel build that fails (no compiler, a compiler torch
    refuses, a compile error) leaves the package without that module, which then runs on the PyTorch
    references with one warning at run time."""
    class OptionalBuildExtension(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, use_ninja=True, **kwargs)

        def build_extensions(self):
            try:
                super().build_extensions()
                compiler = os.environ.get("CXX") or (self.compiler.compiler_cxx or ["c++"])[0]
                recipe.write_cpu_target(self.cpu_target(), compiler, arch)
            except Exception as e:  # noqa: BLE001 - any failure: install without the compiled kernels
                print(f"merge_engine: the compiled kernels could not be built ({type(e).__name__}: {e}); the "
                      "package installs without them and runs on the PyTorch references", file=sys.stderr)
                self.extensions = []  # nothing to copy or record

        def cpu_target(self) -> str:
            module = self.get_ext_fullpath(f"merge_engine.{recipe.CPU_MODULE}")
            return os.path.join(os.path.dirname(module), recipe.CPU_TARGET)

        def copy_extensions_to_source(self):  # an editable install: the record goes beside the module
            super().copy_extensions_to_source()
            if self.extensions:
                package = self.get_finalized_command("build_py").get_package_dir("merge_engine")
                target = os.path.join(self.build_lib, "merge_engine", recipe.CPU_TARGET)
                self.copy_file(target, os.path.join(package, recipe.CPU_TARGET), level=self.verbose)

        def get_outputs(self):
            return [*super().get_outputs(), self.cpu_target()] if self.extensions else []
    return OptionalBuildExtension


setup(**{"install_requires": DEPENDENCIES, **extensions()})
