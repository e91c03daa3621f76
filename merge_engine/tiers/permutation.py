"""Block permutations: the general form of keys and of tiers (compositions of keys).

A Block is (layer, index) of one block part (attn_qkv, attn_out, mlp_up, mlp_down: see blocks.py). A
BlockPermutation maps, for each part, each moved destination block to the source block whose values it receives:

    keyed[part][dst] = original[part][perm.source(part, dst)]

Blocks not listed stay where they are. Parts, not key lists, are the unit because key lists share them: an
attn_heads swap moves attn_qkv and attn_out, an attn_out_heads swap attn_out only, so a tier of two keys may move a
head's o columns along a different path than its q/k/v rows. A key (disjoint swaps) is its own inverse; a tier made
by applying key 1, then key 2, ... is in general not a set of swaps, hence this form. index_tables() turns a part
into dense per-layer int64 tables for gather/scatter kernels and keyed forwards.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from merge_engine.tiers.blocks import KEY_KINDS, PARTS

Block = tuple[int, int]


class BlockPermutation:
    """For each part, destination block -> source block (moved blocks only).

    maps is keyed by part or by key list (a key list's map applies to each of its parts); a part given twice, or
    directly and through a key list, is refused."""

    def __init__(self, maps: Mapping[str, Mapping[Block, Block]]):
        unknown = set(maps) - set(PARTS) - set(KEY_KINDS)
        if unknown:
            raise ValueError(f"unknown block part(s) or key list(s) {sorted(unknown)} (expected one of "
                             f"{PARTS + tuple(KEY_KINDS)})")
        self._maps: dict[str, dict[Block, Block]] = {part: {} for part in PARTS}
        given: dict[str, str] = {}
        for name, m in maps.items():
            for part in KEY_KINDS.get(name, (name,)):
                if part in given:
                    raise ValueError(f"part {part} is given twice ({given[part]} and {name})")
                given[part] = name
                self._maps[part] = {d: s for d, s in m.items() if d != s}
        for part, m in self._maps.items():
            if sorted(m) != sorted(m.values()):
                raise ValueError(f"{part}: not a permutation (the moved destinations and sources differ)")

    @classmethod
    def from_swaps(cls, swaps: Mapping[str, Iterable[tuple[Block, Block]]]) -> BlockPermutation:
        """A permutation from disjoint swaps (a, b) by key list or part: a receives b and b receives a."""
        maps: dict[str, dict[Block, Block]] = {part: {} for part in PARTS}
        for name, pairs in swaps.items():
            for part in KEY_KINDS.get(name, (name,)):
                for a, b in pairs:
                    maps[part][a], maps[part][b] = b, a
        return cls(maps)

    def moved(self, part: str) -> dict[Block, Block]:
        """Destination -> source of every moved block of this part (a copy)."""
        return dict(self._map(part))

    def source(self, part: str, block: Block) -> Block:
        return self._map(part).get(block, block)

    def _map(self, part: str) -> dict[Block, Block]:
        if part not in self._maps:
            raise ValueError(f"unknown block part {part!r} (one of {PARTS}; a key list such as mlp_cols moves "
                             "several parts, which may move differently in a tier)")
        return self._maps[part]

    def inverse(self) -> BlockPermutation:
        return BlockPermutation({kind: {s: d for d, s in m.items()} for kind, m in self._maps.items()})

    def then(self, other: BlockPermutation) -> BlockPermutation:
        """Apply self, then other: the result's dst takes original[self.source(other.source(dst))]."""
        maps = {}
        for part in PARTS:
            touched = self._maps[part].keys() | other._maps[part].keys()
            maps[part] = {d: self.source(part, other.source(part, d)) for d in touched}
        return BlockPermutation(maps)

    def is_identity(self) -> bool:
        return not any(self._maps.values())

    def layer_moves(self, part: str) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per destination layer: (dst index, src layer, src index) int64 tensors of its moved blocks, by dst."""
        rows: dict[int, list[tuple[int, int, int]]] = {}
        for (dl, di), (sl, si) in sorted(self._map(part).items()):
            rows.setdefault(dl, []).append((di, sl, si))
        return {layer: tuple(torch.tensor(r, dtype=torch.int64).T.contiguous()) for layer, r in rows.items()}

    def index_tables(self, part: str, num_layers: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense [num_layers, num_blocks] int64 tables (src_layer, src_index): keyed[l, i] = original[src_layer[l, i],
        src_index[l, i]]; unmoved blocks point at themselves."""
        src_layer = torch.arange(num_layers).repeat_interleave(num_blocks).view(num_layers, num_blocks)
        src_index = torch.arange(num_blocks).repeat(num_layers, 1)
        for (dl, di), (sl, si) in self._map(part).items():
            src_layer[dl, di], src_index[dl, di] = sl, si
        return src_layer, src_index

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockPermutation) and self._maps == other._maps

    def __repr__(self) -> str:
        return "BlockPermutation(" + ", ".join(f"{k}: {len(m)} moved" for k, m in self._maps.items() if m) + ")"


def compose(*keys) -> BlockPermutation:
    """The tier reached by applying keys in order (TierKeys or BlockPermutations); inverse() undoes it."""
    result = BlockPermutation({})
    for key in keys:
        result = result.then(key if isinstance(key, BlockPermutation) else key.permutation())
    return result
