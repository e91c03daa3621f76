"""Output that keeps an input checkpoint's layout: same shard files, same headers, every tensor at its input offset.

A keyed model differs from its public one only in the swapped rows and columns, so copying the input's header
bytes and index verbatim (rather than planning shards by size as the merge does) keeps the sharding the user
had, any header metadata, and makes keying then unkeying give back the input files bit for bit.
"""
from __future__ import annotations

import json
import os
import struct

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import INDEX_FILE, Checkpoint, require_safetensors
from merge_engine.io.writer import ShardedWriter, ShardLayout


def input_layout(ckpt: Checkpoint) -> list[ShardLayout]:
    """The checkpoint's own files as an output layout: header bytes, sizes and tensor offsets copied."""
    require_safetensors(ckpt, "writing a keyed or patched copy")
    by_file: dict[str, list[str]] = {}
    for name, info in sorted(ckpt.tensors.items(), key=lambda item: (item[1].file, item[1].data_start)):
        by_file.setdefault(info.file, []).append(name)
    return [_file_layout(path, names, ckpt) for path, names in sorted(by_file.items())]


def _file_layout(path: str, names: list[str], ckpt: Checkpoint) -> ShardLayout:
    with open(path, "rb") as f:
        prefix = f.read(8)
        header = prefix + f.read(struct.unpack("<Q", prefix)[0])
    unlisted = set(json.loads(header[8:])) - {"__metadata__", *names}
    if unlisted:  # its bytes would not be copied, yet the copied header would list it
        raise CheckpointError(f"{path}: holds tensor(s) {sorted(unlisted)[:3]} that {INDEX_FILE} does not list")
    return ShardLayout(os.path.basename(path), header, os.path.getsize(path),
                       {name: ckpt.tensors[name].data_start for name in names})


def layout_writer(out_dir: str, ckpt: Checkpoint, overwrite: bool = False, own_shards: list[int] | None = None,
                  join: str | None = None) -> ShardedWriter:
    """A ShardedWriter (temporary folder, atomic commit) that reproduces the checkpoint's files and index (own_shards
    and join: one rank's part of it, as ShardedWriter says)."""
    entries = [(name, info.dtype, info.shape) for name, info in ckpt.tensors.items()]
    index = os.path.join(ckpt.path, INDEX_FILE)
    return ShardedWriter(out_dir, entries, overwrite=overwrite, layout=input_layout(ckpt),
                         index_file=index if os.path.exists(index) else None, own_shards=own_shards, join=join)
