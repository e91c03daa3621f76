"""Applying and removing keys in place: only the moved rows and columns of the safetensors files are rewritten.

Crash safety comes from the journal (journal.py): the original values of every range to be overwritten are made
durable first; each moved block then receives its source's value read back from the journal (which holds every
source, since a permutation's sources are its destinations), one tensor at a time; the files are fsynced and the
journal deleted. An interrupted operation is rolled back by recover(), which every in-place command runs first. An
exclusive lock on the folder keeps two in-place commands from interleaving.

Test hook: with MERGE_ENGINE_TIERS_TEST_PAUSE_AFTER=N in the environment, the operation stops once the journal is
durable and N tensors have been rewritten, prints "paused" on stderr and sleeps, so that a test can kill it there.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import sys
import time
from typing import Callable

import torch

from merge_engine.errors import OutputError
from merge_engine.io.checkpoint import Checkpoint, require_safetensors
from merge_engine.tiers.apply import KeyedRun, Keys, params_moved, resolve
from merge_engine.tiers.journal import JOURNAL_FILE, PARTIAL_SUFFIX, Journal
from merge_engine.tiers.moves import TensorMove, plan_moves, stored
from merge_engine.tiers.slices import BITS_DTYPES, OpenFiles, Runs, to_runs, write_runs

log = logging.getLogger("merge_engine.tiers")
PAUSE_ENV = "MERGE_ENGINE_TIERS_TEST_PAUSE_AFTER"


def apply_key_in_place(model_dir: str, keys: Keys) -> KeyedRun:
    """Key the model folder itself (keys applied in order)."""
    return _in_place(model_dir, keys, invert=False)


def remove_key_in_place(model_dir: str, keys: Keys) -> KeyedRun:
    """Unkey the model folder itself (keys given in the order they were applied)."""
    return _in_place(model_dir, keys, invert=True)


def recover(model_dir: str) -> bool:
    """Roll back an interrupted in-place operation; True when there was one."""
    with folder_lock(model_dir):
        return roll_back_pending(model_dir)


@contextlib.contextmanager
def folder_lock(model_dir: str):
    try:
        fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise OutputError(f"{model_dir}: cannot open the model folder ({e.strerror})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{model_dir}: another in-place key or patch operation is running on this folder") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def roll_back_pending(model_dir: str) -> bool:
    partial = os.path.join(model_dir, JOURNAL_FILE + PARTIAL_SUFFIX)
    if os.path.exists(partial):  # the crash came before any weight was touched
        os.unlink(partial)
    journal = Journal.load(model_dir)
    if journal is None:
        return False
    journal.roll_back()
    log.warning("%s: rolled back an interrupted in-place key or patch operation", model_dir)
    return True


def _in_place(model_dir: str, keys: Keys, invert: bool) -> KeyedRun:
    start = time.perf_counter()
    with folder_lock(model_dir):
        roll_back_pending(model_dir)
        ckpt = Checkpoint(model_dir)
        try:
            require_safetensors(ckpt, "keying in place")
            blocks, perm = resolve(keys, ckpt)
            moves = plan_moves(ckpt, blocks, perm.inverse() if invert else perm)
            _rewrite(ckpt, moves)
        finally:
            ckpt.close()
    return KeyedRun(ckpt.path, ckpt.path, len(moves), params_moved(ckpt, moves), time.perf_counter() - start)


def _rewrite(ckpt: Checkpoint, moves: dict[str, TensorMove]) -> None:
    by_place = {(m.layer, m.suffix): m for m in moves.values()}

    def rewrite(files: OpenFiles, journal: Journal, name: str) -> None:
        values = _incoming(journal, moves[name], by_place, ckpt.tensors[name].dtype.itemsize)
        write_runs(files.fd(ckpt.tensors[name].file), stored(ckpt.tensors[name]), moves[name].dim,
                   to_runs(moves[name].dst), values)

    journaled_rewrite(ckpt, {n: (moves[n].dim, to_runs(moves[n].dst)) for n in moves}, rewrite)


def journaled_rewrite(ckpt: Checkpoint, selections: dict[str, tuple[int, Runs]],
                      rewrite: Callable[[OpenFiles, Journal, str], None]) -> None:
    """The in-place protocol: journal every (dim, runs) selection of the named tensors, then rewrite(files, journal,
    name) each tensor in file order, sync; any failure rolls every write back. The caller holds folder_lock."""
    order = sorted(selections, key=lambda n: (ckpt.tensors[n].file, ckpt.tensors[n].data_start))
    with OpenFiles(os.O_RDWR) as files:
        for name in order:  # every refusal before the journal exists
            open_for_rewrite(files, ckpt.tensors[name].file)
        journal = Journal.write(ckpt.path, [(n, stored(ckpt.tensors[n]), *selections[n]) for n in order], files)
        try:
            for done, name in enumerate(order, 1):
                rewrite(files, journal, name)
                test_pause(done)
            files.sync()
        except BaseException:
            journal.roll_back()
            raise
    journal.discard()


def open_for_rewrite(files: OpenFiles, path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_nlink > 1:
        raise OutputError(f"{path}: is a {'symbolic' if stat.S_ISLNK(st.st_mode) else 'hard'} link (a Hugging Face "
                          "cache?); rewriting it in place would change the other copies too. Key into a new folder, "
                          "or copy the folder first (cp -L)")
    try:
        files.fd(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot open for writing ({e.strerror})") from e


def _incoming(journal: Journal, move: TensorMove, by_place: dict, itemsize: int) -> torch.Tensor:
    """The values a tensor's moved elements receive: their sources' original values, from the journal."""
    shape = list(journal.entries[move.name].shape)
    values = torch.empty(shape, dtype=BITS_DTYPES[itemsize])
    for layer in move.src_layer.unique().tolist():
        sel = (move.src_layer == layer).nonzero().squeeze(1)
        source = by_place[layer, move.suffix]
        positions = torch.searchsorted(source.dst, move.src[sel])
        values.index_copy_(move.dim, sel, journal.original(source.name, positions))
    return values


def test_pause(done: int) -> None:
    if os.environ.get(PAUSE_ENV) == str(done):
        print("paused", file=sys.stderr, flush=True)
        time.sleep(600)
