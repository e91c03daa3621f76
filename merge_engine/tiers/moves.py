"""A block permutation spelled out on a checkpoint's tensors: which elements of which tensor change, and from where.

Everything here is checked against the checkpoint's headers before any tensor data is read or written: each tensor a
block kind touches must exist in every layer, with the size config.json implies along the block dimension.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint, split_layer_name
from merge_engine.io.safetensors_format import TensorInfo
from merge_engine.tiers.blocks import PARTS, Member, ModelBlocks
from merge_engine.tiers.permutation import BlockPermutation
from merge_engine.tiers.slices import Stored


@dataclass(frozen=True)
class TensorMove:
    """Along dim, element dst[i] of this tensor receives element src[i] of the same tensor of layer src_layer[i]."""

    name: str
    layer: int
    suffix: str
    dim: int
    dst: torch.Tensor  # sorted, distinct
    src_layer: torch.Tensor
    src: torch.Tensor


def stored(info: TensorInfo) -> Stored:
    return Stored(info.file, info.data_start, info.shape, info.dtype.itemsize)


def layer_tensor_names(tensor_names, where: str, error=CheckpointError) -> dict[tuple[int, str], str]:
    """(layer, name within the layer) -> full tensor name; where names the model in the error (of type error)
    raised when two tensors claim one place."""
    names: dict[tuple[int, str], str] = {}
    for name in tensor_names:
        split = split_layer_name(name)
        if split:
            _, layer, suffix = split
            if (layer, suffix) in names:
                raise error(f"{where}: layer {layer} '{suffix}' is ambiguous ('{names[layer, suffix]}' and '{name}'); "
                            "tier keys support single-stack language models only")
            names[layer, suffix] = name
    return names


def check_tensors(ckpt: Checkpoint, blocks: ModelBlocks) -> dict[tuple[int, str], str]:
    """The names of every tensor the block kinds touch, checked to exist with the expected shape."""
    names = layer_tensor_names(ckpt.tensors, ckpt.path)
    for kind in blocks.parts.values():
        for member in kind.members:
            first = None
            for layer in range(blocks.num_layers):
                name = names.get((layer, member.suffix))
                if name is None:
                    raise CheckpointError(f"{ckpt.path}: layer {layer} has no '{member.suffix}' tensor, which "
                                          f"{blocks.model_type} {kind.name} blocks need")
                _check_shape(ckpt.tensors[name], member)
                first = first or ckpt.tensors[name]
                _check_dtype(ckpt.tensors[name], first)
    return names


def _check_dtype(info: TensorInfo, first: TensorInfo) -> None:
    """Blocks move between layers as bits: one dtype in every layer (another would be reinterpreted)."""
    if info.dtype != first.dtype:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' is {str(info.dtype).removeprefix('torch.')} but "
                              f"'{first.name}' ({first.file}) is {str(first.dtype).removeprefix('torch.')}: "
                              "blocks move between layers only within one dtype")


def _check_shape(info: TensorInfo, member: Member) -> None:
    problem = member.shape_problem(info.shape)
    if problem:
        raise CheckpointError(f"{info.file}: tensor '{info.name}' {problem}")


def plan_moves(ckpt: Checkpoint, blocks: ModelBlocks, perm: BlockPermutation) -> dict[str, TensorMove]:
    """The moves of every tensor the permutation changes, by tensor name."""
    names = check_tensors(ckpt, blocks)
    moves = {}
    for part in PARTS:
        for layer, (dst_blocks, src_layers, src_blocks) in perm.layer_moves(part).items():
            for member in blocks.parts[part].members:
                dst = member.indices(dst_blocks)
                order = torch.argsort(dst)
                per_block = len(member.offsets) * member.width
                name = names[layer, member.suffix]
                moves[name] = TensorMove(name, layer, member.suffix, member.dim, dst[order],
                                         src_layers.repeat_interleave(per_block)[order],
                                         member.indices(src_blocks)[order])
    return moves
