"""Patch shards written front to back while the list of tensors they will hold is still unknown.

Which tensors a patch stores (unchanged ones are left out, fixups exist only where needed) is known only once
each difference has been computed. Rather than hold a shard in memory or read the inputs twice, each shard
reserves room for its header up front, appends tensor data as it comes, and writes its header last, padded
with spaces as the safetensors format allows: memory holds one tensor, the inputs are read once.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct

import torch

from merge_engine.dtypes import SAFETENSORS_CODES
from merge_engine.io.raw import tensor_bytes
from merge_engine.tiers.slices import pwrite_all


def header_room(names: list[str], entries_per_name: int) -> int:
    """Header bytes enough for every name with that many entries (a suffix, a dtype, a shape of up to 8
    dimensions and two offsets of up to 20 digits each), rounded up to a multiple of 8."""
    per_entry = 300
    room = 64 + sum((len(json.dumps(n)) + per_entry) * entries_per_name for n in names)
    return room + -room % 8


class AppendedShards:
    """Shards `<stem>-00001.safetensors`, ... in a folder, each closed once it passes shard_size bytes."""

    def __init__(self, folder: str, stem: str, room: int, shard_size: int):
        self.folder, self.stem, self.room, self.shard_size = folder, stem, room, shard_size
        self.files: list[str] = []
        self.bytes_written = 0
        self._fd = -1
        self._header: dict = {}
        self._end = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._fd < 0 or self._end >= self.shard_size:
            self._close_shard()
            self._open_shard()
        t = tensor.detach().cpu().contiguous()
        data = tensor_bytes(t)
        with self._naming():
            pwrite_all(self._fd, data, 8 + self.room + self._end)
        self._header[name] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._end, self._end + len(data)]}
        self._end += len(data)
        self.bytes_written += len(data)

    def finish(self) -> None:
        """Write the last header and make every shard durable."""
        self._close_shard()

    def _open_shard(self) -> None:
        name = f"{self.stem}-{len(self.files) + 1:05d}.safetensors"
        self._fd = os.open(os.path.join(self.folder, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.files.append(name)
        self._header, self._end = {"__metadata__": {"format": "pt"}}, 0

    def _close_shard(self) -> None:
        if self._fd < 0:
            return
        raw = json.dumps(self._header, separators=(",", ":")).encode()
        if len(raw) > self.room:
            raise RuntimeError(f"{self.files[-1]}: header of {len(raw)} bytes exceeds the {self.room} reserved")
        with self._naming():
            pwrite_all(self._fd, memoryview(struct.pack("<Q", self.room) + raw + b" " * (self.room - len(raw))), 0)
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    @contextlib.contextmanager
    def _naming(self):
        """An OSError of a write to the open shard (a full disk, a quota) names it: pwrite's and fsync's do not."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, os.path.join(self.folder, self.files[-1])) from e
            raise

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
