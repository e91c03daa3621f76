"""Output that keeps an input checkpoint's layout: same shard files, same headers, every tensor at its input offset.

A keyed model differs from its public one only in the swapped rows and columns, so copying the input's header
bytes and index verbatim (rather than planning shards by size as ShardedWriter does) keeps the sharding the user
had, any header metadata, and makes keying then unkeying give back the input files bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import INDEX_FILE, Checkpoint
from merge_engine.io.writer import ShardedWriter, _Shard, check_output_dir


class LayoutWriter(ShardedWriter):
    """ShardedWriter (temporary folder, write(name, tensor), side files, atomic commit) with the input's layout."""

    def __init__(self, out_dir: str, ckpt: Checkpoint, overwrite: bool = False):
        self.out_dir = os.path.abspath(out_dir)
        self.overwrite = overwrite
        check_output_dir(self.out_dir, overwrite)
        parent, base = os.path.split(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp_dir = os.path.join(parent, f".{base}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        os.makedirs(self.tmp_dir)
        self._entries = {name: (info.dtype, info.shape) for name, info in ckpt.tensors.items()}
        self._infos = ckpt.tensors
        by_file: dict[str, list[str]] = {}
        for name, info in sorted(ckpt.tensors.items(), key=lambda item: (item[1].file, item[1].data_start)):
            by_file.setdefault(info.file, []).append(name)
        self._shards = [_Shard(os.path.basename(f), names) for f, names in sorted(by_file.items())]
        self._where = {}
        self.total_size = sum(info.nbytes for info in ckpt.tensors.values())
        for shard in self._shards:
            self._open_shard(shard)
        self._pending = set(self._entries)
        self.bytes_written = 0
        index = os.path.join(ckpt.path, INDEX_FILE)
        self._index = index if os.path.exists(index) else None

    def _open_shard(self, shard: _Shard) -> None:
        source = self._infos[shard.names[0]].file
        with open(source, "rb") as f:
            prefix = f.read(8)
            header = prefix + f.read(struct.unpack("<Q", prefix)[0])
        unlisted = set(json.loads(header[8:])) - {"__metadata__", *shard.names}
        if unlisted:  # its bytes would not be copied, yet the copied header would list it
            raise CheckpointError(f"{source}: holds tensor(s) {sorted(unlisted)[:3]} that {INDEX_FILE} does not list")
        shard.fd = os.open(os.path.join(self.tmp_dir, shard.filename), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(shard.fd, header, 0)
        os.ftruncate(shard.fd, os.path.getsize(source))
        for name in shard.names:
            self._where[name] = (shard, self._infos[name].data_start)

    def commit(self) -> None:
        """As ShardedWriter.commit, with the input's index copied instead of a new one written."""
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(f"{len(missing)} tensor(s) were never written, e.g. {missing[:3]}")
        if self._index:
            self.copy_file(self._index)
        for shard in self._shards:
            os.fsync(shard.fd)
        self._close()
        self._move_into_place()
