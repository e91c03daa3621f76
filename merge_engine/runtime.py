"""Process-wide settings that speed up CPU merges. Importing merge_engine never makes them: they change
the behaviour of everything else in the process, so a library must not make them behind its caller's
back. The `merge-engine` command opts in (its process exists to merge); a Python caller opts in with
tune_process_for_merging() before the process creates its first tensor: torch reads THP_MEM_ALLOC_ENABLE
once, at its first CPU allocation (of any size), and ignores it afterwards. Importing merge_engine
allocates no tensor, so the call may follow the imports; the OpenMP setting takes effect only when the
call (or the caller's environment) comes before torch is imported.

Measured effects on 2 CPU cores, 1.1B-parameter bf16 merges (docs/performance.md):
- transparent huge pages for torch's large CPU tensors: faulting fresh tensors in 4 KB pages cost as
  much as the merge math. Except in a virtual machine whose host takes back free huge pages
  (host_reclaims_free_huge_pages): there a fresh huge page is backed again at its first touch, 10-25 ms
  for 2 MB where its 4 KB pages take about 1 ms, which doubled a 1.1B TIES merge (25 s against 10-14 s),
  so the opt-in leaves huge pages off there;
- glibc keeping freed heap memory (mallopt): without it, every tensor's temporaries come back as fresh
  zeroed pages, 19% of a slerp merge's CPU samples and 46% of a linear merge's;
- OpenMP threads that sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE) instead of spinning: a
  merge runs thousands of short torch ops while its read and write threads need the same cores; spinning
  took 20% of a slerp merge's CPU samples, and passive waits halved its user CPU time (18 -> 8 s, 1.1B
  warm-cache slerp).
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def tune_process_for_merging() -> dict[str, bool]:
    """Opt this process into the settings; returns which are in effect. Values the user set in the
    environment are left as they are."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "0" if host_reclaims_free_huge_pages() else "1")
    if "torch" not in sys.modules:  # the OpenMP runtime reads it once, when it loads with torch
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return {"huge_pages": os.environ["THP_MEM_ALLOC_ENABLE"] == "1",
            "keep_freed_heap_memory": keep_freed_heap_memory(),
            "passive_openmp_threads": os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"}


VIRTIO_BALLOON, VIRTIO_BALLOON_F_REPORTING = "0x0005", 5  # device id and feature bit (virtio spec 5.5.3)


@functools.cache
def host_reclaims_free_huge_pages(sys_root: str = "/sys") -> bool:
    """True in a Linux guest whose host takes back its free memory in blocks as large as a huge page: a
    virtio balloon that negotiated free page reporting, reporting blocks of at most a huge page's order.
    Free huge-page-sized blocks then go back to the host, and a huge page faulted from one is backed
    again, page by page, at its first touch. Small pages mostly come from smaller free blocks, which
    stay backed."""
    virtio = os.path.join(sys_root, "bus", "virtio", "devices")
    try:
        devices = os.listdir(virtio)
    except OSError:
        return False
    reporting = False
    for device in devices:
        try:
            with open(os.path.join(virtio, device, "device")) as f:
                kind = f.read().strip()
            with open(os.path.join(virtio, device, "features")) as f:
                features = f.read().strip()  # one character per feature bit, bit 0 first
        except OSError:
            continue
        reporting |= kind == VIRTIO_BALLOON and features[VIRTIO_BALLOON_F_REPORTING:VIRTIO_BALLOON_F_REPORTING + 1] == "1"
    if not reporting:
        return False
    # the smallest block order reported free (default: the pageblock order, 9 on x86-64), against a huge page's
    reporting_order = _read_int(os.path.join(sys_root, "module", "page_reporting", "parameters", "page_reporting_order"))
    huge_page_bytes = _read_int(os.path.join(sys_root, "kernel", "mm", "transparent_hugepage", "hpage_pmd_size"))
    huge_page_order = (huge_page_bytes // os.sysconf("SC_PAGE_SIZE")).bit_length() - 1 if huge_page_bytes else 9
    return (9 if reporting_order is None else reporting_order) <= huge_page_order


def _read_int(path: str) -> int | None:
    """The integer a sysfs file holds, or None when it is missing or holds something else."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def keep_freed_heap_memory() -> bool:
    """glibc: serve allocations up to 32 MB (its largest setting) from the heap instead of fresh
    mappings, and keep up to 1 GB of freed heap memory instead of returning it to the system. False
    where the C library has no mallopt (not glibc) or refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process as one of several ranks (its environment says so)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return "RANK" in os.environ and size.isdigit() and int(size) > 1
