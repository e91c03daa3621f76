"""Positional reads and writes of chosen rows or columns (any one dimension) of a tensor stored in a file.

A selection along dim of a tensor [outer..., n, inner...] is a list of runs of consecutive indices. In the file each
run is one contiguous segment per outer index: a run of rows is one segment; a run of columns of a matrix is one
segment per row; segments that touch are merged. A selection is read or written with one positional read or write
per segment, from or into a buffer that holds the selected values contiguously, shaped [outer..., n_selected,
inner...]; past MAX_SEGMENTS segments (a few columns of a tall matrix), the whole tensor is read once instead and a
write becomes read, patch in memory, write back whole (the bytes outside the selection are written unchanged).
Values are handled as integers of the same width (bit patterns), so every dtype is copied exactly.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.raw import tensor_bytes

BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

Runs = list[tuple[int, int]]
MAX_SEGMENTS = 256  # beyond this many positional reads or writes for one selection, move the whole tensor


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes lie in a file."""

    path: str
    data_start: int  # absolute offset of the first element
    shape: tuple[int, ...]
    itemsize: int


def to_runs(indices: torch.Tensor) -> Runs:
    """Runs [start, stop) of consecutive values of a sorted tensor of distinct indices."""
    runs: Runs = []
    for v in indices.tolist():
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


def selected_shape(shape: tuple[int, ...], dim: int, runs: Runs) -> tuple[int, ...]:
    return (*shape[:dim], sum(b - a for a, b in runs), *shape[dim + 1:])


def segments(stored: Stored, dim: int, runs: Runs) -> Iterator[tuple[int, int]]:
    """(file offset, byte count) of each segment of a selection, in buffer order, touching ones merged."""
    outer = math.prod(stored.shape[:dim])
    inner = math.prod(stored.shape[dim + 1:]) * stored.itemsize
    stride = stored.shape[dim] * inner
    start, size = -1, 0
    for o in range(outer):
        base = stored.data_start + o * stride
        for a, b in runs:
            offset = base + a * inner
            if offset == start + size:
                size += (b - a) * inner
                continue
            if size:
                yield start, size
            start, size = offset, (b - a) * inner
    if size:
        yield start, size


def many_segments(stored: Stored, dim: int, runs: Runs) -> bool:
    return math.prod(stored.shape[:dim]) * len(runs) > MAX_SEGMENTS


def run_indices(runs: Runs) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.empty(0, dtype=torch.int64)


def read_whole(fd: int, stored: Stored) -> torch.Tensor:
    """The whole tensor as bit patterns, in one positional read."""
    out = torch.empty(stored.shape, dtype=BITS_DTYPES[stored.itemsize])
    _pread_exact(fd, tensor_bytes(out), stored.data_start, stored.path)
    return out


def read_runs(fd: int, stored: Stored, dim: int, runs: Runs) -> torch.Tensor:
    if many_segments(stored, dim, runs):
        return read_whole(fd, stored).index_select(dim, run_indices(runs))
    out = torch.empty(selected_shape(stored.shape, dim, runs), dtype=BITS_DTYPES[stored.itemsize])
    view = tensor_bytes(out)
    pos = 0
    for offset, n in segments(stored, dim, runs):
        if os.preadv(fd, [view[pos:pos + n]], offset) != n:  # short reads are rare: finish them apart
            _pread_exact(fd, view[pos:pos + n], offset, stored.path)
        pos += n
    return out


def write_runs(fd: int, stored: Stored, dim: int, runs: Runs, values: torch.Tensor) -> None:
    if many_segments(stored, dim, runs):
        whole = read_whole(fd, stored)
        whole.index_copy_(dim, run_indices(runs), values.view(whole.dtype))
        pwrite_all(fd, tensor_bytes(whole), stored.data_start)
        return
    view = tensor_bytes(values.contiguous())
    pos = 0
    for offset, n in segments(stored, dim, runs):
        pwrite_all(fd, view[pos:pos + n], offset)
        pos += n


def read_indices(fd: int, stored: Stored, dim: int, indices: torch.Tensor) -> torch.Tensor:
    """Values at the given indices along dim (any order, repeats allowed), read with positional reads."""
    unique, where = torch.unique(indices, sorted=True, return_inverse=True)
    return read_runs(fd, stored, dim, to_runs(unique)).index_select(dim, where)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width."""
    return t.view(BITS_DTYPES[t.element_size()])


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _pread_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: file ended early at byte {offset + done} (truncated?)")
        done += n


class OpenFiles:
    """File descriptors by path, opened on first use and closed together."""

    def __init__(self, flags: int = os.O_RDONLY):
        self._flags = flags
        self._fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, self._flags)
        return self._fds[path]

    def sync(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
