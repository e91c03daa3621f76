"""Which byte ranges of a file the page cache holds, so that each read takes the faster path.

An O_DIRECT read goes to the disk even when the page cache holds the bytes: right for a model read
once from a cold disk (no copy through the cache, no eviction of the machine's cache), wrong for a
model the cache already holds (a merge run twice, a model just downloaded or written): there a plain
read is a memory copy. `direct_io="auto"` (the engine's default) asks the kernel, per tensor, which
pages are resident (mincore on a read-only mapping of the file, which reads nothing) and reads the
resident ranges with plain reads and the rest with O_DIRECT. Resident runs of pages need no minimum
length; a missing run shorter than MIN_DIRECT_RUN is read plainly with its neighbours, as a scattered
few pages are not worth a direct read each.

Where the kernel will not say (not Linux, a mapping refused, or a file the process neither owns nor
may write: Linux answers mincore for those only about pages this process has mapped, so a warm cache
looks cold), every page counts as absent, which reads as `direct_io="on"` does.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading

import torch

MIN_DIRECT_RUN = 1 << 20
PAGE = mmap.PAGESIZE


class _Libc:
    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap, self.munmap, self.mincore = libc.mmap, libc.munmap, libc.mincore
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _libc() -> _Libc | None:
    try:
        return _Libc()
    except (OSError, AttributeError):  # no C library with mmap/mincore (not Linux or BSD)
        return None


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


class ResidencyMap:
    """A read-only mapping of one file, only ever asked which of its pages are resident (never read)."""

    def __init__(self, path: str):
        self._addr, self._size = None, 0
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if _LIBC is not None and size:
                addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr not in (None, _MAP_FAILED):
                    self._addr, self._size = addr, size
        finally:
            os.close(fd)  # the mapping keeps the file

    def resident_pages(self, start: int, end: int) -> torch.Tensor | None:
        """Residency (bool per page) of the pages start // PAGE onwards that hold bytes [start, end);
        None where unknown."""
        first, last = start // PAGE, min(-(-end // PAGE), -(-self._size // PAGE))
        if self._addr is None or last <= first:
            return None
        flags = (ctypes.c_ubyte * (last - first))()
        if _LIBC.mincore(self._addr + first * PAGE, (last - first) * PAGE, flags) != 0:
            return None
        return torch.frombuffer(flags, dtype=torch.uint8).bitwise_and(1).bool()

    def close(self) -> None:
        if self._addr is not None:
            _LIBC.munmap(self._addr, self._size)
            self._addr = None

    def __del__(self):
        self.close()


def read_spans(resident: torch.Tensor | None, start: int, end: int) -> list[tuple[int, int, bool]]:
    """[start, end) split into (span start, span end, read plainly?) spans on page boundaries (resident:
    the pages from start // PAGE on): resident runs plainly, missing runs of at least MIN_DIRECT_RUN
    bytes with O_DIRECT, shorter missing runs plainly with their neighbours. resident=None: all direct."""
    if resident is None or not bool(resident.any()):
        return [(start, end, False)]
    if bool(resident.all()):
        return [(start, end, True)]
    edges = (torch.nonzero(resident[1:] != resident[:-1]).flatten() + 1).tolist()
    pages = [0, *edges, len(resident)]
    first = start // PAGE
    spans: list[tuple[int, int, bool]] = []
    for a, b in zip(pages, pages[1:]):
        lo, hi = max(start, (first + a) * PAGE), min(end, (first + b) * PAGE)
        plain = bool(resident[a]) or hi - lo < MIN_DIRECT_RUN
        if spans and spans[-1][2] == plain:
            spans[-1] = (spans[-1][0], hi, plain)
        else:
            spans.append((lo, hi, plain))
    return spans


class ResidencyMaps:
    """One ResidencyMap per file, made on first use (thread-safe)."""

    def __init__(self):
        self._maps: dict[str, ResidencyMap] = {}
        self._lock = threading.Lock()

    def spans(self, file: str, start: int, end: int) -> list[tuple[int, int, bool]]:
        with self._lock:
            if file not in self._maps:
                self._maps[file] = ResidencyMap(file)
            residency = self._maps[file]
        return read_spans(residency.resident_pages(start, end), start, end)

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                m.close()
            self._maps.clear()
