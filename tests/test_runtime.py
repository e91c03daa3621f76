"""Process-wide settings: importing the package or calling the Python API makes none of them; the
command line opts in; the heap setting does what it says."""
import ctypes
import platform
import subprocess
import sys
import textwrap

import pytest

from merge_engine.runtime import keep_freed_heap_memory

if sys.platform == "linux":
    import resource

# Runs in a fresh interpreter: records every lookup of mallopt through ctypes and the environment,
# imports the package, merges through the Python API, then through the command line.
PROBE = textwrap.dedent("""
    import ctypes, os, sys, tempfile
    looked_up = []
    class Recording(ctypes.CDLL):
        def __getattr__(self, name):
            looked_up.append(name)
            return super().__getattr__(name)
    ctypes.CDLL = Recording
    environ = dict(os.environ)

    import merge_engine
    from merge_engine.demo import make_synthetic_llama
    work = tempfile.mkdtemp()
    shape = dict(layers=2, hidden=32, intermediate=48, vocab=64)
    base = make_synthetic_llama(os.path.join(work, "base"), seed=0, **shape)
    expert = make_synthetic_llama(os.path.join(work, "expert"), seed=1, base=base, **shape)
    config = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, expert)]}
    merge_engine.merge(merge_engine.parse_config(config), os.path.join(work, "api"), merge_engine.MergeOptions(device="cpu", quiet=True))
    print("api", dict(os.environ) == environ, "mallopt" in looked_up)

    import yaml
    with open(os.path.join(work, "c.yml"), "w") as f:
        yaml.safe_dump(config, f)
    from merge_engine.cli import main
    assert main([os.path.join(work, "c.yml"), os.path.join(work, "cli"), "--device", "cpu", "-q"]) == 0
    print("cli", os.environ.get("THP_MEM_ALLOC_ENABLE"), "mallopt" in looked_up)
""")

# The command, as users run it: OMP_WAIT_POLICY is set before torch loads (it cannot be changed later).
COMMAND_PROBE = textwrap.dedent("""
    import os, sys
    from merge_engine.cli import main
    assert "torch" not in sys.modules, "importing the command's entry module loaded torch"
    main(["--help"])
""")


def test_only_the_command_line_changes_the_process():
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["api True False", "cli 1 True"], run.stdout


def test_the_command_sets_openmp_waits_before_torch_loads():
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    probe = COMMAND_PROBE + "\nprint(os.environ.get('OMP_WAIT_POLICY'))"
    run = subprocess.run([sys.executable, "-c", probe.replace('main(["--help"])', 'main(["--version"])')],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "None"  # --version imports nothing and tunes nothing
    run = subprocess.run([sys.executable, "-c", probe.replace('main(["--help"])', 'main(["/nonexistent.yml", "/tmp/x"])')],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.stdout.split()[-1] == "PASSIVE", run.stdout + run.stderr


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keep_freed_heap_memory_reuses_freed_pages():
    """After it, a freed 16 MB block comes back for the next allocation without page faults (the kernel
    zeroes every page it faults in); by default glibc maps blocks that size fresh and unmaps them on free."""
    assert keep_freed_heap_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20

    def touched_block():  # (address, minor page faults taken to allocate and write it)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        return p, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    a, _ = touched_block()
    b, _ = touched_block()  # keeps a's space from being the heap's top, which trimming would return
    libc.free(a)
    c, faults = touched_block()
    libc.free(b)
    libc.free(c)
    assert faults <= 2, f"{faults} page faults re-allocating a freed 16 MB block"


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


HUGE_PAGES = textwrap.dedent("""
    import sys
    import merge_engine, merge_engine.cli   # the command's first imports: they must allocate no tensor,
    import merge_engine.engine, merge_engine.tiers, merge_engine.cli.merge  # nor may the rest of the package
    from merge_engine import ops            # (declaring the ops included), so that a Python caller may opt in late
    merge_engine.tune_process_for_merging()
    import torch
    x = torch.ones(256 << 20, dtype=torch.uint8)
    with open("/proc/self/smaps_rollup") as f:
        print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")))
""")


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs transparent huge pages in madvise mode (here: "
                    f"{_thp_mode()}), where only torch's opt-in (THP_MEM_ALLOC_ENABLE) gives its tensors huge pages")
@pytest.mark.parametrize("opt_in", [True, False])
def test_the_opt_in_gives_torch_huge_pages_when_made_after_importing_the_package(opt_in):
    """torch reads THP_MEM_ALLOC_ENABLE once, at its first CPU allocation: had importing merge_engine allocated a
    tensor (declaring an op can), the command's opt-in would silently do nothing (it did: 64M-element TIES ran
    15-20% slower)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    probe = HUGE_PAGES if opt_in else HUGE_PAGES.replace("merge_engine.tune_process_for_merging()", "")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    huge_kb = int(run.stdout.split()[-1])
    assert (huge_kb >= 128 << 10) == opt_in, huge_kb  # at least half of the 256 MB tensor, or none
