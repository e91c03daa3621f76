"""Which parameters a tier key moves, per architecture: the block kinds and where a block lies in each tensor.

A key swaps blocks of parameters within or across layers. There are two kinds of block, as in the published
reference code (McGill-NLP/tiered-language-models):
- "mlp_cols": one intermediate neuron: its row of the up projections (gate and up, or c_fc) with their biases where
  the architecture has them, and its column of the down projection;
- "attn_heads": one attention unit: its rows of q, k, v (with biases where present) and its columns of o.

Grouped-query attention (Qwen2, Llama 3, Mistral): a head block is one whole KV group: one kv head's k and v rows,
plus the q rows and o columns of the num_heads / num_kv_heads query heads that attend with it. A group is the
smallest self-contained unit of such a layer: moving a single query head would leave it reading the kv head of its
new position, and moving a kv head with only one of its query heads would strand the others. With whole groups,
every keyed layer is an ordinary GQA layer (query head h still uses kv head h // group) whose group came whole from
somewhere, and two blocks never share a row, so swaps stay disjoint and a key stays its own inverse. For
multi-head attention a group is one head, which is what the reference means by a head.

A block's place in one tensor is a Member: the tensor's name within a layer, the dimension the block spans, and the
element indices of block b along it: offset + b * width + [0, width) for each offset (GPT-2's fused c_attn holds
q, k and v side by side, so its head blocks have three offsets).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_engine.errors import CheckpointError

ATTN_HEADS = "attn_heads"
MLP_COLS = "mlp_cols"
BLOCK_KINDS = (ATTN_HEADS, MLP_COLS)
_LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*_LLAMA_LIKE, "gpt2", "gpt_neo")


@dataclass(frozen=True)
class Member:
    """Where the blocks of one kind lie in one tensor of a layer."""

    suffix: str  # tensor name within a layer, e.g. "self_attn.q_proj.weight"
    dim: int  # the dimension a block spans
    width: int  # elements of one block at each offset
    offsets: tuple[int, ...]
    extent: int  # size of that dimension
    cross: int  # elements per index along dim (the product of the other dimensions)

    def indices(self, blocks: torch.Tensor) -> torch.Tensor:
        """Element indices along dim of the given block numbers, block by block (int64)."""
        span = torch.arange(self.width)
        offsets = torch.tensor(self.offsets)
        return (blocks[:, None, None] * self.width + offsets[None, :, None] + span).reshape(-1)

    @property
    def params_per_block(self) -> int:
        return len(self.offsets) * self.width * self.cross


@dataclass(frozen=True)
class BlockKind:
    name: str
    count: int  # blocks per layer
    members: tuple[Member, ...]

    @property
    def params_per_block(self) -> int:
        return sum(m.params_per_block for m in self.members)


@dataclass(frozen=True)
class ModelBlocks:
    """The swappable blocks of one model, read from its config.json."""

    model_type: str
    architecture: str | None
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    kinds: dict[str, BlockKind]

    @property
    def swappable_params(self) -> int:
        return self.num_layers * sum(k.count * k.params_per_block for k in self.kinds.values())


def model_blocks(config: dict, source: str = "config.json") -> ModelBlocks:
    """The block layout of a model from its config.json; source names the file in error messages."""
    model_type = config.get("model_type")
    try:
        if model_type in _LLAMA_LIKE:
            return _llama_like(config)
        if model_type == "gpt2":
            return _gpt2(config)
        if model_type == "gpt_neo":
            return _gpt_neo(config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot read the {model_type} sizes needed for tier keys ({e!r})") from e
    raise CheckpointError(f"{source}: model_type {model_type!r} is not supported by tier keys "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


def _architecture(config: dict) -> str | None:
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs else None


def _group(heads: int, kv_heads: int) -> int:
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return heads // kv_heads


def _llama_like(cfg: dict) -> ModelBlocks:
    hidden, heads, inter = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["intermediate_size"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or hidden // heads)
    g = _group(heads, kv)
    qkv_bias = cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias"))
    mlp_bias = bool(cfg.get("mlp_bias"))
    attn = [Member("self_attn.q_proj.weight", 0, g * hd, (0,), heads * hd, hidden),
            Member("self_attn.k_proj.weight", 0, hd, (0,), kv * hd, hidden),
            Member("self_attn.v_proj.weight", 0, hd, (0,), kv * hd, hidden)]
    if qkv_bias:
        attn += [Member(m.suffix.replace(".weight", ".bias"), 0, m.width, (0,), m.extent, 1) for m in attn]
    attn.append(Member("self_attn.o_proj.weight", 1, g * hd, (0,), heads * hd, hidden))
    mlp = [Member(f"mlp.{p}_proj.{w}", 0, 1, (0,), inter, hidden if w == "weight" else 1)
           for p in ("gate", "up") for w in (("weight", "bias") if mlp_bias else ("weight",))]
    mlp.append(Member("mlp.down_proj.weight", 1, 1, (0,), inter, hidden))
    return ModelBlocks(cfg["model_type"], _architecture(cfg), int(cfg["num_hidden_layers"]), heads, kv, hd, hidden,
                       inter, {ATTN_HEADS: BlockKind(ATTN_HEADS, kv, tuple(attn)),
                               MLP_COLS: BlockKind(MLP_COLS, inter, tuple(mlp))})


def _gpt2(cfg: dict) -> ModelBlocks:
    # Conv1D weights are stored [in, out]: c_attn and c_fc outputs are columns, c_proj inputs are rows.
    hidden, heads = int(cfg["n_embd"]), int(cfg["n_head"])
    inter = int(cfg.get("n_inner") or 4 * hidden)
    hd = hidden // heads
    qkv = (0, hidden, 2 * hidden)
    attn = (Member("attn.c_attn.weight", 1, hd, qkv, 3 * hidden, hidden),
            Member("attn.c_attn.bias", 0, hd, qkv, 3 * hidden, 1),
            Member("attn.c_proj.weight", 0, hd, (0,), hidden, hidden))
    mlp = (Member("mlp.c_fc.weight", 1, 1, (0,), inter, hidden),
           Member("mlp.c_fc.bias", 0, 1, (0,), inter, 1),
           Member("mlp.c_proj.weight", 0, 1, (0,), inter, hidden))
    return ModelBlocks("gpt2", _architecture(cfg), int(cfg["n_layer"]), heads, heads, hd, hidden, inter,
                       {ATTN_HEADS: BlockKind(ATTN_HEADS, heads, attn), MLP_COLS: BlockKind(MLP_COLS, inter, mlp)})


def _gpt_neo(cfg: dict) -> ModelBlocks:
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_heads"])
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    hd = hidden // heads
    attn = tuple(Member(f"attn.attention.{p}_proj.weight", 0, hd, (0,), hidden, hidden) for p in "qkv") + (
        Member("attn.attention.out_proj.weight", 1, hd, (0,), hidden, hidden),)
    mlp = (Member("mlp.c_fc.weight", 0, 1, (0,), inter, hidden),
           Member("mlp.c_fc.bias", 0, 1, (0,), inter, 1),
           Member("mlp.c_proj.weight", 1, 1, (0,), inter, hidden))
    return ModelBlocks("gpt_neo", _architecture(cfg), int(cfg["num_layers"]), heads, heads, hd, hidden, inter,
                       {ATTN_HEADS: BlockKind(ATTN_HEADS, heads, attn), MLP_COLS: BlockKind(MLP_COLS, inter, mlp)})
