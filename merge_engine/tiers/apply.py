"""Applying and removing tier keys by streaming a checkpoint into a new folder.

Each tensor is read whole with Checkpoint.read; its moved rows or columns are replaced by their sources, taken from
the tensor itself for moves within a layer, else read from the source layer's tensor with positional reads of just
those rows or columns (read once, up front: read_outgoing); it is then written at its input offset (layout.py). Memory
holds one tensor and the key's moved blocks. The output appears only when complete; the input is never modified.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_engine.distributed import (
    Ranks,
    check_same_plan,
    commit_shared_writer,
    current_ranks,
    digest,
    every_rank,
    open_shared_writer,
    own_shards,
)
from merge_engine.errors import OutputError
from merge_engine.io.checkpoint import INDEX_FILE, Checkpoint, refuse_pending_journal
from merge_engine.io.writer import ShardedWriter, check_output_apart
from merge_engine.progress import progress_bar
from merge_engine.tiers.blocks import (
    ATTENTION_KINDS,
    ATTN_OUT,
    ATTN_QKV,
    PARTS,
    ModelBlocks,
    model_blocks,
    published_layout,
)
from merge_engine.tiers.key import TierKey, TierKeyError, validate_key
from merge_engine.tiers.layout import input_layout, layout_writer
from merge_engine.tiers.moves import TensorMove, plan_moves, stored
from merge_engine.tiers.permutation import BlockPermutation, compose
from merge_engine.tiers.slices import OpenFiles, as_bits, read_runs, to_runs

log = logging.getLogger("merge_engine.tiers")

Keys = TierKey | BlockPermutation | Sequence[TierKey | BlockPermutation]
# Weights in other formats would carry the unkeyed values into the keyed folder; they are not copied.
_OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".onnx",
                  ".index.json")


@dataclass
class KeyedRun:
    """What one apply or remove did."""

    model: str
    output: str
    tensors_changed: int
    params_moved: int
    seconds: float

    def summary(self) -> str:
        where = "in place" if self.output == self.model else f"-> {self.output}"
        return (f"{self.model} {where}: {self.params_moved:,} parameters moved in {self.tensors_changed} tensors "
                f"in {self.seconds:.2f} s")


def resolve(keys: Keys, ckpt: Checkpoint) -> tuple[ModelBlocks, BlockPermutation]:
    """Check each key against the checkpoint's config and compose them (key 1 first)."""
    return keyed_layout(keys, ckpt.config, os.path.join(ckpt.path, "config.json"), ckpt.path)


def keyed_layout(keys: Keys, config: dict, source: str, model: str) -> tuple[ModelBlocks, BlockPermutation]:
    """The model's blocks as the keys mean them, and the keys checked and composed (key 1 first). Keys of the
    published code (read without merge_engine's metadata) mean its attention rows, where those differ (a config
    whose head_dim is not hidden_size / num_attention_heads: blocks.published_layout)."""
    keys = [keys] if isinstance(keys, (TierKey, BlockPermutation)) else list(keys)
    blocks = model_blocks(config, source)
    # keys without attention swaps mean the same in both layouts
    published = [isinstance(key, TierKey) and key.published for key in keys if _moves_attention(key)]
    theirs = published_layout(config, blocks) if any(published) else None
    if theirs is not None:
        if not all(published):
            raise TierKeyError(f"{model}: keys of the published code (without merge_engine's metadata) and keys made "
                               "here mean different attention rows on this model (config.json's head_dim "
                               f"{blocks.head_dim} is not hidden_size / num_attention_heads = "
                               f"{blocks.hidden_size // blocks.num_heads}); apply them one kind at a time")
        log.warning("%s: the keys have no merge_engine metadata (the published code's): their attention blocks are "
                    "its rows, with head_dim = hidden_size / num_attention_heads = %d, not config.json's head_dim %d",
                    model, blocks.hidden_size // blocks.num_heads, blocks.head_dim)
        blocks = theirs
    return blocks, compose_checked(keys, blocks, model)


def _moves_attention(key) -> bool:
    if isinstance(key, TierKey):
        return any(key.swaps(kind) for kind in ATTENTION_KINDS)
    return isinstance(key, BlockPermutation) and any(key.moved(part) for part in (ATTN_QKV, ATTN_OUT))


def check_bounds(perm: BlockPermutation, blocks: ModelBlocks, model: str) -> None:
    for part in PARTS:
        moved = perm.moved(part)
        if moved and part not in blocks.parts:
            raise TierKeyError(f"permutation moves {part} blocks, which {blocks.model_type} ({model}) does not have")
        for block in (b for pair in moved.items() for b in pair):
            count = blocks.parts[part].count
            if not (0 <= block[0] < blocks.num_layers and 0 <= block[1] < count):
                raise TierKeyError(f"permutation moves {part} block {list(block)}, outside {model} "
                                   f"({blocks.num_layers} layers of {count})")


def compose_checked(keys: Keys, blocks: ModelBlocks, model: str) -> BlockPermutation:
    """The tier of the keys (applied in order), each checked against the model first."""
    keys = [keys] if isinstance(keys, (TierKey, BlockPermutation)) else list(keys)
    if not keys:
        raise TierKeyError("no key given")
    for key in keys:
        if isinstance(key, TierKey):
            validate_key(key, blocks, model)
        elif isinstance(key, BlockPermutation):
            check_bounds(key, blocks, model)
        else:
            raise TierKeyError(f"a key must be a TierKey (load_key, generate_key) or a BlockPermutation, got a "
                               f"{type(key).__name__}")
    return compose(*keys)


def check_streamed_output(model_dir: str, out_dir: str, inputs: Sequence[str] = ()) -> None:
    """A streamed rewrite of a model folder reads a complete model (no interrupted in-place operation) and writes
    elsewhere: apart from the model folder and the other inputs (keys, patches), not one of them, not inside one,
    none inside it (io/writer.py: check_output_apart). Checked before anything is read."""
    refuse_pending_journal(model_dir)
    if os.path.realpath(out_dir) == os.path.realpath(model_dir):
        raise OutputError(f"{out_dir}: the output folder is the model folder; use --in-place to rewrite it")
    check_output_apart(out_dir, [model_dir, *inputs])


def stream_rewrite(ckpt: Checkpoint, out_dir: str, overwrite: bool, write_tensors, ranks: Ranks | None = None,
                   progress: str | None = None) -> str:
    """Write a rewritten copy of the model folder: write_tensors(writer) writes the writer's tensors
    (writer.tensor_names: every tensor, or with ranks those of this rank's shards, each shard written by one
    rank) into the input's own layout, the side files follow, and the folder appears only when complete.
    progress: a progress bar's label (bytes written), in one process. Returns the output folder."""
    own = own_shards(ranks, [2 * shard.size for shard in input_layout(ckpt)])  # read once, written once
    writer = open_shared_writer(ranks, lambda join: layout_writer(out_dir, ckpt, overwrite, own, join))
    try:
        with every_rank(ranks, "writing"), progress_bar(
                total=sum(ckpt.tensors[n].nbytes for n in writer.tensor_names), unit="B", unit_scale=True,
                desc=progress, disable=progress is None or ranks is not None) as bar:
            write_tensors(_Counted(writer, bar))
            ckpt.check_unchanged()
            if writer.maker:
                copy_side_files(ckpt.path, writer)
            writer.flush()
        commit_shared_writer(ranks, writer)
    except BaseException:
        writer.abort()
        raise
    return writer.out_dir


class _Counted:
    """A writer whose writes advance a progress bar by their bytes."""

    def __init__(self, writer: ShardedWriter, bar):
        self._writer, self._bar = writer, bar

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.write(name, tensor)
        self._bar.update(tensor.nbytes)

    def __getattr__(self, name: str):
        return getattr(self._writer, name)


def in_file_order(ckpt: Checkpoint, names=None) -> list[str]:
    """Tensor names (all, or the given ones) in the order their bytes lie in the files."""
    return sorted(ckpt.tensors if names is None else names,
                  key=lambda n: (ckpt.tensors[n].file, ckpt.tensors[n].data_start))


def apply_key(model_dir: str, keys: Keys, out_dir: str, overwrite: bool = False, progress: bool = False) -> KeyedRun:
    """Write the keyed model (keys applied in order) to out_dir (progress: a progress bar, in one process)."""
    return _stream(model_dir, keys, out_dir, overwrite, invert=False, progress=progress)


def remove_key(model_dir: str, keys: Keys, out_dir: str, overwrite: bool = False, progress: bool = False) -> KeyedRun:
    """Write the public model of a model keyed with these keys (given in the order they were applied)."""
    return _stream(model_dir, keys, out_dir, overwrite, invert=True, progress=progress)


def _stream(model_dir: str, keys: Keys, out_dir: str, overwrite: bool, invert: bool, progress: bool) -> KeyedRun:
    """Called on every rank of an initialised torch.distributed process group, the ranks share the output's
    shards (distributed.py); the result is the same, byte for byte."""
    start = time.perf_counter()
    ranks = current_ranks()
    with every_rank(ranks, "reading the model's headers"):
        check_streamed_output(model_dir, out_dir, _key_files(keys))
        ckpt = Checkpoint(model_dir)
    try:
        with every_rank(ranks, "planning"):
            blocks, perm = resolve(keys, ckpt)
            moves = plan_moves(ckpt, blocks, perm.inverse() if invert else perm)
        check_same_plan(ranks, digest(ckpt.path, moves, input_layout(ckpt), os.path.realpath(out_dir), overwrite))
        out = stream_rewrite(ckpt, out_dir, overwrite, lambda writer: _write_tensors(ckpt, moves, writer), ranks,
                             ("removing the key" if invert else "applying the key") if progress else None)
    finally:
        ckpt.close()
    return KeyedRun(ckpt.path, out, len(moves), params_moved(ckpt, moves), time.perf_counter() - start)


def _key_files(keys: Keys) -> list[str]:
    """The files the keys were read from (a key made in memory has none)."""
    keys = [keys] if isinstance(keys, (TierKey, BlockPermutation)) else list(keys)
    return [k.source for k in keys if isinstance(k, TierKey) and os.path.isfile(k.source)]


def _write_tensors(ckpt: Checkpoint, moves: dict[str, TensorMove], writer: ShardedWriter) -> None:
    names = in_file_order(ckpt, writer.tensor_names)
    with OpenFiles() as files:
        outgoing = read_outgoing(ckpt, moves, files, names)

        def read_partner(layer: int, suffix: str, dim: int, index: torch.Tensor) -> torch.Tensor:
            held, values = outgoing[layer, suffix]
            return values.index_select(dim, torch.searchsorted(held, index))

        for name in names:
            tensor = ckpt.read(name)
            if name in moves:
                patch(as_bits(tensor), moves[name], read_partner)
            writer.write(name, tensor)


def read_outgoing(ckpt: Checkpoint, moves: dict[str, TensorMove], files: OpenFiles, written: Sequence[str]):
    """(layer, suffix) -> (sorted indices other layers take from that tensor, their values as bit patterns), for the
    moves of the tensors written here.

    Read up front, once per source tensor (a moved column touches every row of its tensor: slices.read_runs then
    reads the tensor whole), not once per destination. Memory: the key's share of the touched kinds."""
    names = {(m.layer, m.suffix): name for name, m in moves.items()}
    wanted: dict[tuple[int, str], list[torch.Tensor]] = {}
    for m in (moves[name] for name in written if name in moves):
        for layer in m.src_layer.unique().tolist():
            if layer != m.layer:
                wanted.setdefault((layer, m.suffix), []).append(m.src[m.src_layer == layer])
    outgoing = {}
    for (layer, suffix), parts in wanted.items():
        name = names[layer, suffix]
        index = torch.cat(parts).unique(sorted=True)
        info = ckpt.tensors[name]
        outgoing[layer, suffix] = (index, read_runs(files.fd(info.file), stored(info), moves[name].dim, to_runs(index)))
    return outgoing


def patch(bits: torch.Tensor, move: TensorMove, read_partner) -> None:
    """Give the moved elements of one tensor (as bit patterns) their sources' values, in place."""
    shape = list(bits.shape)
    shape[move.dim] = len(move.dst)
    incoming = torch.empty(shape, dtype=bits.dtype)
    for layer in move.src_layer.unique().tolist():
        sel = (move.src_layer == layer).nonzero().squeeze(1)
        src = move.src[sel]
        part = bits.index_select(move.dim, src) if layer == move.layer else \
            read_partner(layer, move.suffix, move.dim, src)
        incoming.index_copy_(move.dim, sel, part)
    bits.index_copy_(move.dim, move.dst, incoming)


def params_moved(ckpt: Checkpoint, moves: dict[str, TensorMove]) -> int:
    return sum(len(m.dst) * ckpt.tensors[name].numel // ckpt.tensors[name].shape[m.dim] for name, m in moves.items())


def copy_side_files(model_dir: str, writer: ShardedWriter) -> None:
    """Copy config, tokenizer and other top-level files; leave out weights in other formats and subfolders."""
    for entry in sorted(os.scandir(model_dir), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name == INDEX_FILE or entry.name.endswith(".safetensors"):
            continue
        if entry.is_dir() or entry.name.endswith(_OTHER_WEIGHTS):
            log.warning("%s: not copied (%s); only the safetensors weights are keyed", entry.path,
                        "a folder" if entry.is_dir() else "weights in another format would stay unkeyed")
            continue
        writer.copy_file(entry.path)
