"""Process-wide settings: importing the package or calling the Python API makes none of them; the
command line opts in; the heap setting does what it says."""
import ctypes
import platform
import subprocess
import sys
import textwrap

import pytest

from merge_engine.runtime import host_reclaims_free_huge_pages, keep_freed_heap_memory

if sys.platform == "linux":
    import resource

# Runs in a fresh interpreter: records every lookup of mallopt through ctypes and the environment,
# imports the package, merges quietly through the Python API (which leaves no thread running), then through the
# command line.
PROBE = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
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
    print("api", dict(os.environ) == environ, "mallopt" in looked_up, threading.enumerate() == [threading.main_thread()])

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
    huge = "0" if host_reclaims_free_huge_pages() else "1"
    assert run.stdout.split("\n")[:2] == ["api True False True", f"cli {huge} True"], run.stdout


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


# A merge through the Python API, quiet and with its progress bar, then the caller picks its own start method.
START_METHOD_PROBE = textwrap.dedent("""
    import multiprocessing, os, tempfile, threading
    import merge_engine
    from merge_engine.demo import make_synthetic_llama
    work = tempfile.mkdtemp()
    shape = dict(layers=1, hidden=32, intermediate=48, vocab=64)
    base = make_synthetic_llama(os.path.join(work, "base"), seed=0, **shape)
    config = {"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 1.0}}]}
    for quiet in (True, False):
        merge_engine.merge(config, os.path.join(work, f"out_{quiet}"), merge_engine.MergeOptions(device="cpu", quiet=quiet))
    print(multiprocessing.get_start_method(allow_none=True), [t.name for t in threading.enumerate()])
    multiprocessing.set_start_method("spawn")
""")


def test_a_merge_with_progress_bars_leaves_no_thread_nor_multiprocessing_start_method():
    """tqdm's default lock makes a multiprocessing lock, which fixes the process's start method to the platform's
    default: a caller's multiprocessing.set_start_method after a merge raised 'context has already been set'.
    tqdm's monitor thread, started by a shown bar, outlives it (tqdm 4.70 no longer stops it at the last close)."""
    run = subprocess.run([sys.executable, "-c", START_METHOD_PROBE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[0] == "None ['MainThread']", run.stdout


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
    merge_engine.runtime.host_reclaims_free_huge_pages = lambda: RECLAIMS  # the opt-in's choice, fixed
    print(merge_engine.tune_process_for_merging()["huge_pages"])
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
    probe = HUGE_PAGES.replace("RECLAIMS", "False")
    if not opt_in:
        probe = probe.replace('print(merge_engine.tune_process_for_merging()["huge_pages"])', "print(False)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    reported, huge_kb = run.stdout.split()[-2] == "True", int(run.stdout.split()[-1])
    assert reported == opt_in
    assert (huge_kb >= 128 << 10) == opt_in, huge_kb  # at least half of the 256 MB tensor, or none


@pytest.mark.skipif(_thp_mode() != "madvise", reason=f"needs transparent huge pages in madvise mode (here: {_thp_mode()})")
@pytest.mark.parametrize("user_setting", [None, "1"])
def test_the_opt_in_leaves_huge_pages_off_where_the_host_reclaims_them(user_setting):
    """There a fresh huge page is backed again at its first touch (10-25 ms per 2 MB against about 1 ms for
    its small pages on the project's VM); a value the user set is kept."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_setting
    run = subprocess.run([sys.executable, "-c", HUGE_PAGES.replace("RECLAIMS", "True")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    reported, huge_kb = run.stdout.split()[-2] == "True", int(run.stdout.split()[-1])
    assert reported == (user_setting == "1")
    assert (huge_kb >= 128 << 10) == (user_setting == "1"), huge_kb


def _fake_sys(root, features: str, reporting_order=None, huge_page_bytes=2 << 20, kind="0x0005"):
    """A /sys tree with one virtio device and, optionally, the page_reporting module's order."""
    device = root / "bus" / "virtio" / "devices" / "virtio0"
    device.mkdir(parents=True)
    (device / "device").write_text(kind + "\n")
    (device / "features").write_text(features + "\n")
    thp = root / "kernel" / "mm" / "transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "hpage_pmd_size").write_text(f"{huge_page_bytes}\n")
    if reporting_order is not None:
        params = root / "module" / "page_reporting" / "parameters"
        params.mkdir(parents=True)
        (params / "page_reporting_order").write_text(f"{reporting_order}\n")
    return str(root)


@pytest.mark.skipif(__import__("os").sysconf("SC_PAGE_SIZE") != 4096, reason="the cases assume 4 KiB pages")
@pytest.mark.parametrize("features, order, kind, reclaims", [
    ("0110010100000000000000000000000010", None, "0x0005", True),   # the project's VM: bits 1, 2, 5, 32
    ("0110010100000000000000000000000010", 9, "0x0005", True),
    ("0110010100000000000000000000000010", 10, "0x0005", False),    # only blocks larger than a huge page go back
    ("0110000100000000000000000000000010", None, "0x0005", False),  # a balloon without free page reporting
    ("0110010100000000000000000000000010", None, "0x0002", False),  # bit 5 of a block device means another thing
])
def test_host_reclaims_free_huge_pages_reads_the_balloons_features(tmp_path, features, order, kind, reclaims):
    root = _fake_sys(tmp_path, features, order, kind=kind)
    assert host_reclaims_free_huge_pages.__wrapped__(root) is reclaims


def test_no_virtio_devices_means_no_reclaiming(tmp_path):
    assert host_reclaims_free_huge_pages.__wrapped__(str(tmp_path)) is False
