"""Block permutations: the general form of keys and of tiers (compositions of keys).

A Block is (layer, index) of one block kind (see blocks.py). A BlockPermutation maps, for each kind, each moved
destination block to the source block whose values it receives:

    keyed[kind][dst] = original[kind][perm.source(kind, dst)]

Blocks not listed stay where they are. A key (disjoint swaps) is its own inverse; a tier made by applying key 1,
then key 2, ... is in general not a set of swaps, hence this form. index_tables() turns a kind into dense per-layer
int64 tables for gather/scatter kernels and keyed forwards.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from merge_engine.tiers.blocks import BLOCK_KINDS

Block = tuple[int, int]


class BlockPermutation:
    """For each block kind, destination block -> source block (moved blocks only)."""

    def __init__(self, maps: Mapping[str, Mapping[Block, Block]]):
        unknown = set(maps) - set(BLOCK_KINDS)
        if unknown:
            raise ValueError(f"unknown block kind(s) {sorted(unknown)} (expected {BLOCK_KINDS})")
        self._maps = {kind: {d: s for d, s in maps.get(kind, {}).items() if d != s} for kind in BLOCK_KINDS}
        for kind, m in self._maps.items():
            if sorted(m) != sorted(m.values()):
                raise ValueError(f"{kind}: not a permutation (the moved destinations and sources differ)")

    @classmethod
    def from_swaps(cls, swaps: Mapping[str, Iterable[tuple[Block, Block]]]) -> BlockPermutation:
        """A permutation from disjoint swaps (a, b): a receives b and b receives a."""
        maps: dict[str, dict[Block, Block]] = {}
        for kind, pairs in swaps.items():
            m = maps.setdefault(kind, {})
            for a, b in pairs:
                m[a], m[b] = b, a
        return cls(maps)

    def moved(self, kind: str) -> dict[Block, Block]:
        """Destination -> source of every moved block of this kind (a copy)."""
        return dict(self._maps[kind])

    def source(self, kind: str, block: Block) -> Block:
        return self._maps[kind].get(block, block)

    def inverse(self) -> BlockPermutation:
        return BlockPermutation({kind: {s: d for d, s in m.items()} for kind, m in self._maps.items()})

    def then(self, other: BlockPermutation) -> BlockPermutation:
        """Apply self, then other: the result's dst takes original[self.source(other.source(dst))]."""
        maps = {}
        for kind in BLOCK_KINDS:
            touched = self._maps[kind].keys() | other._maps[kind].keys()
            maps[kind] = {d: self.source(kind, other.source(kind, d)) for d in touched}
        return BlockPermutation(maps)

    def is_identity(self) -> bool:
        return not any(self._maps.values())

    def layer_moves(self, kind: str) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per destination layer: (dst index, src layer, src index) int64 tensors of its moved blocks, by dst."""
        rows: dict[int, list[tuple[int, int, int]]] = {}
        for (dl, di), (sl, si) in sorted(self._maps[kind].items()):
            rows.setdefault(dl, []).append((di, sl, si))
        return {layer: tuple(torch.tensor(r, dtype=torch.int64).T.contiguous()) for layer, r in rows.items()}

    def index_tables(self, kind: str, num_layers: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense [num_layers, num_blocks] int64 tables (src_layer, src_index): keyed[l, i] = original[src_layer[l, i],
        src_index[l, i]]; unmoved blocks point at themselves."""
        src_layer = torch.arange(num_layers).repeat_interleave(num_blocks).view(num_layers, num_blocks)
        src_index = torch.arange(num_blocks).repeat(num_layers, 1)
        for (dl, di), (sl, si) in self._maps[kind].items():
            src_layer[dl, di], src_index[dl, di] = sl, si
        return src_layer, src_index

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockPermutation) and self._maps == other._maps

    def __repr__(self) -> str:
        return "BlockPermutation(" + ", ".join(f"{k}: {len(m)} moved" for k, m in self._maps.items()) + ")"


def compose(*keys) -> BlockPermutation:
    """The tier reached by applying keys in order (TierKeys or BlockPermutations); inverse() undoes it."""
    result = BlockPermutation({})
    for key in keys:
        result = result.then(key if isinstance(key, BlockPermutation) else key.permutation())
    return result
