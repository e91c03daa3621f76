"""How much of a model a key (or a tier of keys) moves: in total and per layer, as a printable table.

Only blocks that land in another layer key anything: reordering blocks within a layer is a symmetry of that layer
(heads and MLP neurons are summed), so such moves are counted apart. The report reads headers and config only.

The comparison of the public and keyed models' outputs (KL divergence, top-1 agreement) is in compare.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from merge_engine.io.checkpoint import Checkpoint, split_layer_name
from merge_engine.tiers.apply import Keys, resolve
from merge_engine.tiers.blocks import ATTN_HEADS, BLOCK_KINDS, MLP_COLS


@dataclass(frozen=True)
class LayerRow:
    layer: int
    heads_in: int  # attention blocks (KV groups on grouped-query models) this layer receives
    mlp_cols_in: int
    params_in: int  # parameters of those blocks
    params_within: int  # of which from this same layer (no effect)
    layer_params: int  # all parameters of the layer


@dataclass(frozen=True)
class KeyReport:
    model: str
    model_type: str
    rows: tuple[LayerRow, ...]
    total_params: int
    swappable_params: int

    @property
    def params_moved(self) -> int:
        return sum(r.params_in for r in self.rows)

    @property
    def params_within(self) -> int:
        return sum(r.params_within for r in self.rows)

    def table(self) -> str:
        lines = [f"{self.model} ({self.model_type})",
                 f"{'layer':>5} {'heads in':>8} {'MLP cols in':>11} {'params moved':>13} {'of layer':>9}"]
        for r in self.rows:
            lines.append(f"{r.layer:>5} {r.heads_in:>8} {r.mlp_cols_in:>11} {r.params_in:>13,} "
                         f"{100 * r.params_in / max(r.layer_params, 1):>8.2f}%")
        moved = self.params_moved
        lines.append(f"total: {moved:,} parameters moved, {100 * moved / max(self.total_params, 1):.2f}% of the "
                     f"model's {self.total_params:,} and {100 * moved / max(self.swappable_params, 1):.2f}% of its "
                     f"{self.swappable_params:,} swappable")
        if self.params_within:
            lines.append(f"of which {self.params_within:,} moved within their own layer, which changes nothing")
        return "\n".join(lines)


def key_report(model_dir: str, keys: Keys) -> KeyReport:
    """What the keys (applied in order) move in the model at model_dir."""
    ckpt = Checkpoint(model_dir)
    try:
        blocks, perm = resolve(keys, ckpt)
    finally:
        ckpt.close()
    counts = {kind: [0] * blocks.num_layers for kind in BLOCK_KINDS}
    within = [0] * blocks.num_layers
    for kind in BLOCK_KINDS:
        per_block = blocks.kinds[kind].params_per_block
        for (dst_layer, _), (src_layer, _) in perm.moved(kind).items():
            counts[kind][dst_layer] += 1
            within[dst_layer] += per_block if src_layer == dst_layer else 0
    layer_params = [0] * blocks.num_layers
    for name, info in ckpt.tensors.items():
        split = split_layer_name(name)
        if split and split[1] < blocks.num_layers:
            layer_params[split[1]] += info.numel
    rows = tuple(LayerRow(layer, counts[ATTN_HEADS][layer], counts[MLP_COLS][layer],
                          sum(counts[k][layer] * blocks.kinds[k].params_per_block for k in BLOCK_KINDS),
                          within[layer], layer_params[layer]) for layer in range(blocks.num_layers))
    return KeyReport(ckpt.path, blocks.model_type, rows, sum(i.numel for i in ckpt.tensors.values()),
                     blocks.swappable_params)
