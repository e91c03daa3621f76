"""The journal of an in-place key operation: the original bytes of every range it will overwrite.

It is durable before the first weight byte is written, so a crash at any point can be rolled back exactly.

File `.merge_engine-key-journal` in the model folder: MAGIC, an 8-byte little-endian header length, a JSON header,
then the payload. Header: {"payload_bytes": N, "entries": [{"file": shard file name, "tensor": name,
"data_start": int, "shape": [...], "itemsize": int, "dim": int, "runs": [[start, stop], ...], "offset": int}]}.
An entry's payload, `offset` bytes after the header, holds the original values of its selection in buffer order,
shaped like the tensor with `dim` cut down to the selected indices (see slices.py).

Protocol: the journal is written as `<name>.partial`, fsynced, renamed to its name and the folder fsynced, so it
exists under its name only when complete; a leftover .partial means no weight was touched yet and is deleted.
Rolling back writes every entry back, fsyncs the files, deletes the journal and fsyncs the folder.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import IN_PLACE_JOURNAL
from merge_engine.io.raw import fsync_path, tensor_bytes
from merge_engine.io.untrusted import inside_folder, is_int, open_regular, parse_json
from merge_engine.tiers.slices import (
    BITS_DTYPES,
    OpenFiles,
    Runs,
    Stored,
    pwrite_all,
    read_indices,
    read_runs,
    selected_shape,
    write_runs,
)

JOURNAL_FILE = IN_PLACE_JOURNAL
PARTIAL_SUFFIX = ".partial"
MAGIC = b"MERGE_ENGINE_KEY_JOURNAL_V1\n"


@dataclass(frozen=True)
class Entry:
    """One tensor's overwritten selection and where its original values lie in the payload."""

    tensor: str
    target: Stored  # the tensor in the model folder
    dim: int
    runs: Runs
    offset: int  # in the payload

    @property
    def shape(self) -> tuple[int, ...]:
        return selected_shape(self.target.shape, self.dim, self.runs)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.target.itemsize

    def to_json(self) -> dict:
        t = self.target
        return {"file": os.path.basename(t.path), "tensor": self.tensor, "data_start": t.data_start,
                "shape": list(t.shape), "itemsize": t.itemsize, "dim": self.dim, "runs": [list(r) for r in self.runs],
                "offset": self.offset}

    @classmethod
    def from_json(cls, model_dir: str, e: dict) -> Entry:
        """The entry, every field checked against the tensor's shape, so that a rollback writes only inside it."""
        name = e["file"]
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"an entry names a file outside the folder: {name!r}")
        try:
            path = inside_folder(model_dir, name, "the journal")
        except CheckpointError as error:
            raise ValueError(str(error)) from None
        tensor = e["tensor"]
        if not isinstance(tensor, str):
            raise ValueError(f"an entry's tensor name is not a string: {tensor!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
            raise ValueError(f"the entry for '{tensor}' has shape {shape!r}, not a list of sizes")
        data_start, itemsize, dim, offset = (e[k] for k in ("data_start", "itemsize", "dim", "offset"))
        if not is_int(data_start) or data_start < 0:
            raise ValueError(f"the entry for '{tensor}' has data_start {data_start!r}")
        if not is_int(itemsize) or itemsize not in BITS_DTYPES:
            raise ValueError(f"the entry for '{tensor}' has itemsize {itemsize!r} (expected one of "
                             f"{sorted(BITS_DTYPES)})")
        if not is_int(dim) or not 0 <= dim < len(shape):
            raise ValueError(f"the entry for '{tensor}' has dim {dim!r}, outside its {len(shape)}-dimensional shape")
        runs = e["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, list) and len(r) == 2 and all(map(is_int, r))
                                                 for r in runs):
            raise ValueError(f"the entry for '{tensor}' has runs that are not [start, stop] integer pairs")
        last = 0
        for a, b in runs:  # increasing, disjoint, inside the tensor along dim
            if not last <= a <= b <= shape[dim]:
                raise ValueError(f"the entry for '{tensor}' has run [{a}, {b}], outside its size {shape[dim]} "
                                 f"along dim {dim} (or out of order)")
            last = b
        if not is_int(offset) or offset < 0:
            raise ValueError(f"the entry for '{tensor}' has offset {offset!r}")
        target = Stored(path, data_start, tuple(shape), itemsize)
        if target.data_start + math.prod(target.shape) * target.itemsize > os.path.getsize(target.path):
            raise ValueError(f"the entry for '{tensor}' runs past the end of {name}")
        return cls(tensor, target, dim, [(a, b) for a, b in runs], offset)


def _check_payload(entries: list[Entry], payload_bytes: int) -> None:
    """Every entry's saved values inside the payload, no two entries for one tensor."""
    names = set()
    for e in entries:
        if e.tensor in names:
            raise ValueError(f"two entries for '{e.tensor}'")
        names.add(e.tensor)
        if e.offset + e.nbytes > payload_bytes:
            raise ValueError(f"the entry for '{e.tensor}' has offset {e.offset} and {e.nbytes} bytes, past the end of "
                             f"the {payload_bytes}-byte payload")


class Journal:
    """A journal in a model folder: its entries by tensor name, and where its payload starts."""

    def __init__(self, model_dir: str, entries: list[Entry], payload_start: int):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, JOURNAL_FILE)
        self.entries = {e.tensor: e for e in entries}
        self.payload_start = payload_start

    @classmethod
    def write(cls, model_dir: str, selections: list[tuple[str, Stored, int, Runs]], files: OpenFiles) -> Journal:
        """Save the current values of each (tensor, where, dim, runs) selection; durable when this returns."""
        entries, pos = [], 0
        for tensor, target, dim, runs in selections:
            entries.append(Entry(tensor, target, dim, runs, pos))
            pos += entries[-1].nbytes
        header = json.dumps({"payload_bytes": pos, "entries": [e.to_json() for e in entries]}).encode()
        journal = cls(model_dir, entries, len(MAGIC) + 8 + len(header))
        partial = journal.path + PARTIAL_SUFFIX
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pwrite_all(fd, memoryview(MAGIC + struct.pack("<Q", len(header)) + header), 0)
            for e in entries:
                values = read_runs(files.fd(e.target.path), e.target, e.dim, e.runs)
                pwrite_all(fd, tensor_bytes(values), journal.payload_start + e.offset)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(partial)
            raise
        os.close(fd)
        os.replace(partial, journal.path)
        fsync_path(model_dir)
        return journal

    @classmethod
    def load(cls, model_dir: str) -> Journal | None:
        """The complete journal in model_dir, or None."""
        path = os.path.join(model_dir, JOURNAL_FILE)
        if not os.path.exists(path):
            return None
        try:
            with open_regular(path) as f:  # a FIFO would block forever
                if f.read(len(MAGIC)) != MAGIC:
                    raise ValueError("not a merge_engine key journal")
                (size,) = struct.unpack("<Q", f.read(8))
                if size > os.path.getsize(path):
                    raise ValueError("its header length runs past its end")
                header = parse_json(f.read(size), "its header")
            payload_start = len(MAGIC) + 8 + size
            if not isinstance(header, dict) or not is_int(header.get("payload_bytes")) or header["payload_bytes"] < 0 \
                    or not isinstance(header.get("entries"), list):
                raise ValueError("its header is not {\"payload_bytes\": N, \"entries\": [...]}")
            if os.path.getsize(path) != payload_start + header["payload_bytes"]:
                raise ValueError("its size does not match its header")
            entries = [Entry.from_json(model_dir, e) for e in header["entries"]]
            _check_payload(entries, header["payload_bytes"])
        except (OSError, ValueError, KeyError, TypeError, OverflowError, struct.error, CheckpointError) as e:
            why = str(e).removeprefix(f"{path}: ")
            raise CheckpointError(f"{path}: damaged key journal ({why}); the weights may be half-keyed: restore the "
                                  "folder from a copy") from e
        return cls(model_dir, entries, payload_start)

    def _saved(self, e: Entry) -> Stored:
        return Stored(self.path, self.payload_start + e.offset, e.shape, e.target.itemsize)

    def original(self, tensor: str, positions: torch.Tensor) -> torch.Tensor:
        """Original values of a journaled tensor at these positions of its selection (along its dim)."""
        e = self.entries[tensor]
        with OpenFiles() as files:
            return read_indices(files.fd(self.path), self._saved(e), e.dim, positions)

    def roll_back(self) -> None:
        """Write every original value back, make it durable, then delete the journal."""
        with OpenFiles() as journal, OpenFiles(os.O_RDWR) as targets:
            for e in self.entries.values():
                values = read_runs(journal.fd(self.path), self._saved(e), e.dim, [(0, e.shape[e.dim])])
                write_runs(targets.fd(e.target.path), e.target, e.dim, e.runs, values)
            targets.sync()
        self.discard()

    def discard(self) -> None:
        os.unlink(self.path)
        fsync_path(self.model_dir)
