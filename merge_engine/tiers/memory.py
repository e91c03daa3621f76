"""Keys applied to or removed from a model in memory, in place: a loaded transformers model or a state dict.

Validation is the streaming commands': the config's block layout, each key's metadata and indices, and every tensor
a block part spans (present in every layer, with the shape the config implies), all before any tensor is changed.

Then each part's permutation moves the blocks of its per-layer tensors with ops.swap_blocks_ (in place; the swap
kernels). A key is a set of disjoint swaps: one call per tensor. A tier (several keys, or a BlockPermutation) is in
general not, but every permutation is the product of two involutions: a cycle d0 <- d1 <- ... <- d(k-1) <- d0
(position i receives position i + 1 mod k) is the reflection i <-> 1 - i followed by the reflection i <-> -i, each
a set of disjoint swaps. So any tier takes two calls per tensor, whatever its cycles, and memory holds only the
blocks being moved.
"""
from __future__ import annotations

import time
from collections.abc import MutableMapping

import torch

from merge_engine import ops
from merge_engine.errors import MergeEngineError
from merge_engine.ops.permute import check_swap_args
from merge_engine.tiers.apply import KeyedRun, Keys, keyed_layout
from merge_engine.tiers.blocks import PARTS, Member, ModelBlocks
from merge_engine.tiers.moves import layer_tensor_names
from merge_engine.tiers.permutation import Block, BlockPermutation

Target = torch.nn.Module | MutableMapping[str, torch.Tensor]


def apply_key_in_memory(target: Target, keys: Keys, config: dict | None = None) -> KeyedRun:
    """Key a model in memory (keys applied in order): a transformers model (its config is read from it) or a state
    dict (pass config, the config.json dict). Changes the tensors in place."""
    return _in_memory(target, keys, config, invert=False)


def remove_key_in_memory(target: Target, keys: Keys, config: dict | None = None) -> KeyedRun:
    """Unkey a model in memory: the keys, given in the order they were applied, removed in place."""
    return _in_memory(target, keys, config, invert=True)


def _in_memory(target: Target, keys: Keys, config: dict | None, invert: bool) -> KeyedRun:
    start = time.perf_counter()
    tensors, config, name = _tensors_of(target, config)
    blocks, perm = keyed_layout(keys, config, f"{name} config", name)
    if invert:
        perm = perm.inverse()
    stacks = layer_stacks(tensors, blocks, name)
    plan = SwapPlan(blocks, perm, next(iter(stacks.values()))[0].device)
    plan.run(stacks)
    return KeyedRun(name, name, plan.tensors_changed, plan.params_moved, time.perf_counter() - start)


class SwapPlan:
    """A permutation as rounds of disjoint swaps per part (at most two: see the module docstring), as int64
    [M, 4] tensors on the device, made once and run on any stacks of the model's tensors."""

    def __init__(self, blocks: ModelBlocks, perm: BlockPermutation, device: torch.device):
        self.blocks = blocks
        self.rounds: dict[str, list[torch.Tensor]] = {}
        changed: set[tuple[int, str]] = set()
        self.params_moved = 0
        for part in PARTS:
            cycles = _cycles(perm.moved(part))
            if not cycles:
                continue
            self.rounds[part] = [torch.tensor(swaps, dtype=torch.int64, device=device)
                                 for swaps in _two_involutions(cycles) if swaps]
            layers = {layer for cycle in cycles for layer, _ in cycle}
            for member in blocks.parts[part].members:
                changed |= {(layer, member.suffix) for layer in layers}
                self.params_moved += sum(map(len, cycles)) * member.params_per_block
        self.tensors_changed = len(changed)

    def run(self, stacks: dict[str, list[torch.Tensor]]) -> None:
        """Move the blocks in place: stacks maps each tensor name within a layer to that tensor of every layer.
        Every swap's arguments are checked before the first moves, so a refusal leaves every tensor as it was."""
        calls = [(views, pairs, dim, member.width)
                 for part, rounds in self.rounds.items() for member in self.blocks.parts[part].members
                 for views, dim in [_blocked(stacks[member.suffix], member)] for pairs in rounds]
        for call in calls:
            check_swap_args(*call)
        with torch.no_grad():
            for call in calls:
                ops.swap_blocks_(*call)


def _tensors_of(target: Target, config: dict | None) -> tuple[dict[str, torch.Tensor], dict, str]:
    if isinstance(target, torch.nn.Module):
        model_config = getattr(target, "config", None)
        if config is None and model_config is None:
            raise MergeEngineError(f"{type(target).__name__} has no .config; pass config (the config.json dict)")
        name = getattr(model_config, "_name_or_path", "") or type(target).__name__
        config = config if config is not None else model_config.to_dict()
        return {n: p.detach() for n, p in target.named_parameters()}, config, name
    if config is None:
        raise MergeEngineError("a state dict needs config (the model's config.json as a dict)")
    return dict(target), config, "state dict"


def layer_stacks(tensors: dict[str, torch.Tensor], blocks: ModelBlocks, name: str) -> dict[str, list[torch.Tensor]]:
    """Name within a layer -> that tensor of every layer, for every tensor a part spans, shapes checked."""
    by_layer = layer_tensor_names(tensors, name, MergeEngineError)
    stacks = {}
    for part in blocks.parts.values():
        for member in part.members:
            stack = []
            for layer in range(blocks.num_layers):
                full = by_layer.get((layer, member.suffix))
                if full is None:
                    raise MergeEngineError(f"{name}: layer {layer} has no '{member.suffix}' tensor, which "
                                           f"{blocks.model_type} {part.name} blocks need")
                problem = member.shape_problem(tuple(tensors[full].shape))
                if problem:
                    raise MergeEngineError(f"{name}: '{full}' {problem}")
                stack.append((full, tensors[full]))
            check_alike(stack, name)
            stacks[member.suffix] = [tensor for _, tensor in stack]
    return stacks


def check_alike(stack: list[tuple[str, torch.Tensor]], where: str) -> None:
    """A key moves blocks between layers as bits: each layer's tensor must have the first's dtype and device."""
    first_name, first = stack[0]
    for full, tensor in stack[1:]:
        if (tensor.dtype, tensor.device) != (first.dtype, first.device):
            raise MergeEngineError(
                f"{where}: '{full}' is {str(tensor.dtype).removeprefix('torch.')} on {tensor.device} but "
                f"'{first_name}' is {str(first.dtype).removeprefix('torch.')} on {first.device}: a key moves blocks "
                "between layers, whose tensors must share one dtype and device")


def _blocked(stack: list[torch.Tensor], member: Member) -> tuple[list[torch.Tensor], int]:
    """Views in which block b of the member is block b of one dimension (GPT-2's fused q/k/v: that dimension split
    into its three equal thirds first, so a head's three slices are one block of the inner dimension)."""
    n = len(member.offsets)
    if n == 1:  # blocks narrower than heads (blocks.published_layout) may leave a remainder, which no block holds
        covered = member.extent - member.extent % member.width
        return [t.narrow(member.dim, 0, covered) for t in stack] if covered < member.extent else stack, member.dim
    return [t.unflatten(member.dim, (n, member.extent // n)) for t in stack], member.dim + 1


def _cycles(moved: dict[Block, Block]) -> list[list[Block]]:
    """The cycles of a permutation given as destination -> source: in each, block i receives block i + 1."""
    cycles, seen = [], set()
    for first in sorted(moved):
        if first in seen:
            continue
        cycle, block = [], first
        while block not in seen:
            seen.add(block)
            cycle.append(block)
            block = moved[block]
        cycles.append(cycle)
    return cycles


def _two_involutions(cycles: list[list[Block]]) -> tuple[list[tuple[int, int, int, int]], ...]:
    """Swap rows (layer_a, block_a, layer_b, block_b) of two rounds of disjoint swaps that, applied in order, make
    every cycle's block i receive block i + 1: first i <-> 1 - i, then i <-> -i (indices mod the cycle length; after
    the first, position i holds block 1 - i; after the second, position i holds what -i held: block 1 + i)."""
    rounds: tuple[list, list] = ([], [])
    for cycle in cycles:
        k = len(cycle)
        for swaps, a in zip(rounds, (1, 0)):
            for i in range(k):
                j = (a - i) % k
                if i < j:
                    swaps.append((*cycle[i], *cycle[j]))
    return rounds
