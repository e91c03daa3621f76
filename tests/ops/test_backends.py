"""Which compiled backend runs: the installed build when its key matches and this CPU has the features it
was built for, a development build only in a source checkout (per key and -march, never waiting on a
killed build's lock), never a compile in an installed package; and the explicit GPU backend choice."""
import concurrent.futures
import contextlib
import importlib
import importlib.machinery
import json
import platform
import shutil
import sysconfig
import threading
import types

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from merge_engine import kernel_build
from merge_engine.errors import MergeEngineError
from merge_engine.ops import backends


@pytest.fixture
def fresh_cache():
    backends.cpu_extension.cache_clear()
    yield
    backends.cpu_extension.cache_clear()


def cpu_build():
    return kernel_build.cpu_build(backends.csrc_dir(), torch.__version__, sysconfig.get_config_var("EXT_SUFFIX"))


@pytest.mark.skipif(not backends.kernels_enabled(), reason="compiled kernels disabled by MERGE_ENGINE_KERNELS=0")
def test_the_loaded_cpu_module_is_the_build_of_these_sources(fresh_cache):
    module = backends.cpu_extension()
    assert module is not None and module.build_key == cpu_build().key
    if kernel_build.cpu_arch() == kernel_build.DEFAULT_CPU_ARCH:  # what the install built: no rebuild
        assert module.__name__ == f"merge_engine.{kernel_build.CPU_MODULE}"


def test_the_key_follows_sources_flags_and_torch(tmp_path, monkeypatch):
    (tmp_path / "cpu").mkdir()
    source = tmp_path / "cpu" / "a.cpp"
    source.write_text("int a;\n")
    (tmp_path / "shared.h").write_text("#pragma once\n")
    sources = kernel_build.cpu_sources(str(tmp_path))
    key = kernel_build.build_key(sources, ["-O3"], "2.13.0", ".so")
    assert key == kernel_build.build_key(sources, ["-O3"], "2.13.0", ".so")
    assert key != kernel_build.build_key(sources, ["-O2"], "2.13.0", ".so")
    assert key != kernel_build.build_key(sources, ["-O3"], "2.14.0", ".so")
    (tmp_path / "shared.h").write_text("#pragma once\nint b;\n")  # a header beside the sources counts
    assert key != kernel_build.build_key(sources, ["-O3"], "2.13.0", ".so")
    monkeypatch.setenv("MERGE_ENGINE_CPU_ARCH", "x86-64-v2; rm -rf /")
    with pytest.raises(ValueError, match="not a -march name"):
        kernel_build.cpu_arch()


def test_the_one_translation_unit_includes_every_cpu_source():
    csrc = backends.csrc_dir()
    with open(f"{csrc}/{kernel_build.CPU_UNITY}") as f:
        included = sorted(line.split('"')[1] for line in f if line.startswith("#include"))
    assert included == sorted(f"cpu/{path.rsplit('/', 1)[1]}" for path in kernel_build.cpu_sources(csrc))
    assert cpu_build().sources == [f"{csrc}/{kernel_build.CPU_UNITY}"]


def test_an_installed_package_never_compiles(fresh_cache, monkeypatch):
    monkeypatch.delenv("MERGE_ENGINE_KERNELS", raising=False)
    monkeypatch.setattr(backends, "source_checkout", lambda: None)
    monkeypatch.setattr(backends, "_installed", lambda build: (None, "merge_engine._cpu_kernels is not installed"))
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("an installed package compiled"))
    with pytest.warns(RuntimeWarning, match="not installed.*pip install --no-build-isolation") as record:
        assert backends.cpu_extension() is None
        assert backends.cpu_extension() is None
    assert len(record) == 1


def test_a_development_build_goes_to_its_key_folder_past_a_killed_builds_lock(fresh_cache, monkeypatch, tmp_path):
    monkeypatch.delenv("MERGE_ENGINE_KERNELS", raising=False)
    monkeypatch.setattr(backends, "source_checkout", lambda: str(tmp_path))
    monkeypatch.setattr(backends, "_installed", lambda build: (None, "stale"))
    build = cpu_build()
    folder = tmp_path / "build" / "kernels" / build.variant
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # torch's own lock file, left by a killed build: load() would wait forever
    loaded, advice = [], []
    module = types.SimpleNamespace(set_huge_page_outputs=advice.append)

    def load(**kwargs):
        assert not (folder / "lock").exists()
        loaded.append(kwargs)
        return module
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(backends.runtime, "host_reclaims_free_huge_pages", lambda: True)
    assert backends.cpu_extension() is module
    assert advice == [False]  # told, when loaded, to leave its outputs on small pages where the host reclaims
    assert loaded[0]["build_directory"] == str(folder) and build.variant in loaded[0]["name"]
    assert loaded[0]["sources"] == build.sources and loaded[0]["extra_cflags"] == build.cflags


def test_the_key_is_the_code_and_the_variant_adds_the_march(monkeypatch):
    monkeypatch.setenv("MERGE_ENGINE_CPU_ARCH", "x86-64-v2")
    portable = cpu_build()
    monkeypatch.setenv("MERGE_ENGINE_CPU_ARCH", "native")
    native = cpu_build()
    assert portable.key == native.key  # an installed module built for any -march runs these sources
    assert portable.variant != native.variant and "-march=x86-64-v2" in portable.cflags


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("c++") is None,
                    reason="the recorded features are x86 instruction-set extensions, read from a C++ compiler")
def test_a_build_records_the_features_its_march_may_use():
    v2, v3 = (kernel_build.target_features("c++", arch) for arch in ("x86-64-v2", "x86-64-v3"))
    assert {"sse4_2", "popcnt", "ssse3"} <= set(v2) and not {"avx", "avx2", "fma"} & set(v2)
    assert {"avx2", "fma", "f16c", "bmi2", "sse4_2"} <= set(v3) and "avx512f" not in v3
    native, flags = kernel_build.target_features("c++", "native"), kernel_build.cpu_flags()
    assert flags is not None and set(native) <= flags  # every macro maps to the flag this CPU lists
    assert kernel_build.target_features("c++", "no-such-cpu") is None


def installed_module(monkeypatch, tmp_path, target, checkout=None, flags=frozenset({"sse4_2", "avx2"})):
    """backends._installed on a fake installed CPU module whose build record is `target`."""
    origin = tmp_path / "_cpu_kernels.so"
    (tmp_path / kernel_build.CPU_TARGET).write_text(json.dumps(target))
    spec = importlib.machinery.ModuleSpec("merge_engine._cpu_kernels", None, origin=str(origin))
    build = cpu_build()
    loaded = types.SimpleNamespace(build_key=build.key)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setattr(importlib, "import_module", lambda name: loaded)
    monkeypatch.setattr(kernel_build, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(backends, "source_checkout", lambda: checkout)
    module, problem = backends._installed(build)
    assert (module is loaded) == (problem is None)
    return problem


def test_a_module_built_for_features_this_cpu_lacks_is_refused_before_it_loads(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib, "import_module", lambda name: pytest.fail("loaded a module this CPU cannot run"))
    origin = tmp_path / "_cpu_kernels.so"
    (tmp_path / kernel_build.CPU_TARGET).write_text(json.dumps({"arch": "native", "features": ["avx2", "avx512f"]}))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: importlib.machinery.ModuleSpec(name, None, origin=str(origin)))
    monkeypatch.setattr(kernel_build, "cpu_flags", lambda: {"sse4_2", "avx2"})
    module, problem = backends._installed(cpu_build())
    assert module is None and "-march=native for a CPU with avx512f, which this CPU lacks" in problem
    assert "MERGE_ENGINE_CPU_ARCH=x86-64-v2" in problem


def test_an_installed_module_of_another_march_is_used_where_this_cpu_runs_it(monkeypatch, tmp_path):
    monkeypatch.delenv("MERGE_ENGINE_CPU_ARCH", raising=False)
    portable = {"arch": "x86-64-v2", "features": ["sse4_2"]}
    assert installed_module(monkeypatch, tmp_path, portable) is None  # a wheel built for other machines
    assert installed_module(monkeypatch, tmp_path, {"arch": "native", "features": ["avx2"]}) is None
    assert installed_module(monkeypatch, tmp_path, portable, flags=set()) is not None
    # in a checkout MERGE_ENGINE_CPU_ARCH picks the build: another -march goes to a development build
    assert "built with -march=x86-64-v2, not" in installed_module(monkeypatch, tmp_path, portable, checkout="/src")
    assert installed_module(monkeypatch, tmp_path, "not a record") is None  # an older build: unchecked


def test_a_development_build_for_features_this_cpu_lacks_is_refused(fresh_cache, monkeypatch):
    monkeypatch.delenv("MERGE_ENGINE_KERNELS", raising=False)
    monkeypatch.setenv("MERGE_ENGINE_CPU_ARCH", "x86-64-v3")
    monkeypatch.setattr(backends, "_installed", lambda build: (None, "stale"))
    monkeypatch.setattr(backends, "source_checkout", lambda: "/src")
    monkeypatch.setattr(kernel_build, "target_features", lambda compiler, arch: ["avx2", "sse4_2"])
    monkeypatch.setattr(kernel_build, "cpu_flags", lambda: {"sse4_2"})
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("built for a CPU this one is not"))
    with pytest.warns(RuntimeWarning, match="MERGE_ENGINE_CPU_ARCH=x86-64-v3 builds for a CPU with avx2, which"):
        assert backends.cpu_extension() is None


@pytest.mark.parametrize("choice, cuda, expected", [
    ("auto", "cuda", "cuda"), ("auto", None, "triton"), ("cuda", "cuda", "cuda"), ("cuda", None, None),
    ("triton", "cuda", "triton"), ("reference", "cuda", None), ("TRITON", "cuda", "triton")])
def test_the_gpu_backend_is_chosen_explicitly(monkeypatch, choice, cuda, expected):
    monkeypatch.setattr(backends, "cuda_extension", lambda: cuda)
    monkeypatch.setattr(backends, "triton_backend", lambda family="task_vectors": "triton")
    monkeypatch.setenv("MERGE_ENGINE_GPU_BACKEND", choice)
    assert backends.gpu_backend("fisher") == expected


def test_an_unknown_gpu_backend_is_refused_before_a_merge(monkeypatch):
    from merge_engine.engine import check_gpu_backend_choice
    monkeypatch.setenv("MERGE_ENGINE_GPU_BACKEND", "cudnn")
    with pytest.raises(MergeEngineError, match="MERGE_ENGINE_GPU_BACKEND='cudnn'.*auto, cuda, triton, reference"):
        check_gpu_backend_choice()
    monkeypatch.setenv("MERGE_ENGINE_GPU_BACKEND", "reference")
    check_gpu_backend_choice()


@pytest.mark.parametrize("value, enabled", [("0", False), ("False", False), ("OFF", False), (" no ", False),
                                            ("1", True), ("", True)])
def test_the_kernel_switch_reads_any_case(monkeypatch, value, enabled):
    monkeypatch.setenv("MERGE_ENGINE_KERNELS", value)
    assert backends.kernels_enabled() is enabled


def test_first_uses_from_several_threads_at_once_load_the_module_once(fresh_cache, monkeypatch):
    # before, each thread that called before the first load ended loaded the module again: in a source checkout,
    # torch's loader built another copy of the kernels for each (minutes each), and threads got different modules
    loads, all_inside = [], threading.Barrier(3)

    def slow_load(kind, recipe):
        loads.append(kind)
        with contextlib.suppress(threading.BrokenBarrierError):  # (only one gets this far at a time: none waits long)
            all_inside.wait(timeout=1)
        return types.SimpleNamespace(set_huge_page_outputs=lambda on: None)
    monkeypatch.setattr(backends, "kernels_enabled", lambda: True)
    monkeypatch.setattr(backends, "_compiled", slow_load)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        modules = list(pool.map(lambda _: backends.cpu_extension(), range(3)))
    assert loads == ["CPU"] and modules[0] is modules[1] is modules[2]
