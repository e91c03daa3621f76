"""How much of a model a key (or a tier of keys) moves: in total and per layer, as a printable table.

Only whole blocks that land in another layer key anything: reordering whole blocks within a layer is a symmetry of
that layer (heads and MLP neurons are summed), so such moves are counted apart; a partial swap (one part of a block)
changes the model wherever it lands. Key sizes are given both ways the reference counts them: as a fraction of the
whole model and of the swappable parameters of the key's kinds, as its generator (and `key generate --fraction`)
counts them for its --attn_mode and --mlp_mode: a side (attention, MLP) of which the key moves one part alone is
partial, any other whole (the generators' default). The report reads headers and config only.

The comparison of the public and keyed models' outputs (KL divergence, top-1 agreement) is in compare.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from merge_engine.io.checkpoint import Checkpoint, split_layer_name
from merge_engine.tiers.apply import Keys, resolve
from merge_engine.tiers.blocks import (
    ATTN_HEADS,
    ATTN_OUT,
    ATTN_OUT_HEADS,
    ATTN_QKV,
    MLP_COLS,
    MLP_DOWN,
    MLP_DOWN_COLS,
    MLP_UP,
    MLP_UP_COLS,
    PARTS,
    ModelBlocks,
)
from merge_engine.tiers.permutation import BlockPermutation

_FAMILIES = ((ATTN_QKV, ATTN_OUT), (MLP_UP, MLP_DOWN))  # the parts of a whole block
_COLUMNS = {ATTN_QKV: "q/k/v in", ATTN_OUT: "o in", MLP_UP: "up in", MLP_DOWN: "down in"}


@dataclass(frozen=True)
class LayerRow:
    layer: int
    blocks_in: dict[str, int]  # part -> blocks of it this layer receives (KV groups on grouped-query models)
    params_in: int  # parameters of those blocks, biases included
    counted_in: int  # the same in key-size terms (blocks.py: Llama/Qwen biases left out, as the reference counts)
    params_within: int  # of which whole blocks from this same layer (no effect)
    layer_params: int  # all parameters of the layer


@dataclass(frozen=True)
class KeyReport:
    model: str
    model_type: str
    rows: tuple[LayerRow, ...]
    total_params: int
    swappable_params: int  # in key-size terms, of the key's kinds (the module docstring)

    @property
    def params_moved(self) -> int:
        return sum(r.params_in for r in self.rows)

    @property
    def counted_moved(self) -> int:
        return sum(r.counted_in for r in self.rows)

    @property
    def params_within(self) -> int:
        return sum(r.params_within for r in self.rows)

    @property
    def fraction_of_model(self) -> float:
        """Key size as the reference's --target_total_pct counts it."""
        return self.counted_moved / max(self.total_params, 1)

    @property
    def fraction_of_swappable(self) -> float:
        """Key size as the reference's --target_pct (and `key generate --fraction`) counts it."""
        return self.counted_moved / max(self.swappable_params, 1)

    def table(self) -> str:
        parts = [p for p in PARTS if any(r.blocks_in.get(p) for r in self.rows)] or [ATTN_QKV, MLP_UP]
        lines = [f"{self.model} ({self.model_type})",
                 f"{'layer':>5} " + " ".join(f"{_COLUMNS[p]:>9}" for p in parts) + f" {'params moved':>13} "
                 f"{'of layer':>9}"]
        for r in self.rows:
            lines.append(f"{r.layer:>5} " + " ".join(f"{r.blocks_in.get(p, 0):>9}" for p in parts) +
                         f" {r.params_in:>13,} {100 * r.params_in / max(r.layer_params, 1):>8.2f}%")
        moved, counted = self.params_moved, self.counted_moved
        lines.append(f"total: {moved:,} parameters moved" +
                     (f" ({counted:,} in key-size terms, without the q/k/v and MLP biases)" if counted != moved else "")
                     + f": {100 * self.fraction_of_model:.2f}% of the model's {self.total_params:,} and "
                     f"{100 * self.fraction_of_swappable:.2f}% of its {self.swappable_params:,} swappable")
        if self.params_within:
            lines.append(f"of which {self.params_within:,} moved as whole blocks within their own layer, which changes "
                         "nothing")
        return "\n".join(lines)


def key_report(model_dir: str, keys: Keys) -> KeyReport:
    """What the keys (applied in order) move in the model at model_dir."""
    ckpt = Checkpoint(model_dir)
    try:
        blocks, perm = resolve(keys, ckpt)
    finally:
        ckpt.close()
    layer_params = [0] * blocks.num_layers
    for name, info in ckpt.tensors.items():
        split = split_layer_name(name)
        if split and split[1] < blocks.num_layers:
            layer_params[split[1]] += info.numel
    within = _moved_within(blocks, perm)
    rows = []
    for layer in range(blocks.num_layers):
        counts = {part: sum(1 for dst_layer, _ in perm.moved(part) if dst_layer == layer) for part in PARTS}
        rows.append(LayerRow(layer, counts,
                             sum(n * blocks.parts[p].params_per_block for p, n in counts.items() if n),
                             sum(n * blocks.parts[p].counted_per_block for p, n in counts.items() if n),
                             within[layer], layer_params[layer]))
    return KeyReport(ckpt.path, blocks.model_type, tuple(rows), sum(i.numel for i in ckpt.tensors.values()),
                     blocks.swappable(_generated_kinds(perm)))


def _generated_kinds(perm: BlockPermutation) -> tuple[str, str]:
    """The attention and MLP kinds a generator would have made the key with, by the parts it moves."""
    moves = {part: bool(perm.moved(part)) for part in PARTS}
    attn = ATTN_OUT_HEADS if moves[ATTN_OUT] and not moves[ATTN_QKV] else ATTN_HEADS
    mlp = {(True, False): MLP_UP_COLS, (False, True): MLP_DOWN_COLS}.get((moves[MLP_UP], moves[MLP_DOWN]), MLP_COLS)
    return attn, mlp


def _moved_within(blocks: ModelBlocks, perm: BlockPermutation) -> list[int]:
    """Per layer, parameters of whole blocks (every part from one source) moved within the layer: a symmetry."""
    within = [0] * blocks.num_layers
    for family in _FAMILIES:
        if not all(p in blocks.parts for p in family):
            continue
        maps = [perm.moved(p) for p in family]
        per_block = sum(blocks.parts[p].params_per_block for p in family)
        for dst, src in maps[0].items():
            if src[0] == dst[0] and all(m.get(dst) == src for m in maps[1:]):
                within[dst[0]] += per_block
    return within
