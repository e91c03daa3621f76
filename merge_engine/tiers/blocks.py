"""Which parameters a tier key moves, per architecture: the block kinds, their parts, and where a part lies in each tensor.

A key swaps blocks of parameters within or across layers. The key lists of the published reference code
(McGill-NLP/tiered-language-models) name five kinds of swap, each moving one or two *parts* of a block:

    key list        parts it moves      Llama / Mistral / Qwen                GPT-Neo (the reference's own layout)
    mlp_cols        mlp_up + mlp_down   gate and up rows (+ biases), down col  c_fc row and bias, c_proj column
    mlp_up_cols     mlp_up              gate and up rows (+ biases)            c_fc row and bias
    mlp_down_cols   mlp_down            down column                            c_proj column
    attn_heads      attn_qkv + attn_out q, k, v rows (+ biases), o columns     q, k, v rows, out_proj columns
    attn_out_heads  attn_out            o columns                              out_proj columns

On GPT-Neo the partial kinds are exactly what the reference's apply_permutation does. Its Llama/Qwen path ignores
them; here they have the natural meaning above on every architecture. A partial swap moves one side of a block and
leaves the other, so it changes the model even within one layer (a whole swap within a layer does not).

Grouped-query attention (Qwen2/3, Llama 3, Mistral): a head block is one whole KV group: one kv head's k and v rows,
plus the q rows and o columns of the num_heads / num_kv_heads query heads that attend with it. A group is the
smallest self-contained unit of such a layer: moving a single query head would leave it reading the kv head of its
new position, and moving a kv head with only one of its query heads would strand the others. With whole groups,
every keyed layer is an ordinary GQA layer (query head h still uses kv head h // group) whose group came whole from
somewhere, and two blocks never share a row, so swaps stay disjoint and a key stays its own inverse. For
multi-head attention a group is one head, which is what the reference means by a head. head_dim is config.head_dim
where the config sets it (Qwen3, Mistral-Nemo), else hidden_size / num_attention_heads.

The reference always takes hidden_size / num_attention_heads (qwen.py's QwenArch.head_dim). Where config.head_dim
says otherwise (Qwen3-0.6B: 1024 / 16 = 64 against 128; Qwen3-4B, Qwen3-32B, Mistral-Nemo) its blocks are other
rows: group i is rows [i * group * 64, (i + 1) * group * 64) of q and [i * 64, (i + 1) * 64) of k and v, which cut
real heads. A key of the reference means those rows, so published_layout() gives them, for keys read without
merge_engine's metadata (tiers/apply.py); only the first num_kv_heads such blocks of each tensor are addressed, and
where config.head_dim is the smaller (q holds heads * head_dim rows) only those that fit in the tensors (the reference
raises an IndexError for the others; here the key is refused by name).

Qwen3's q_norm and k_norm are one head_dim-sized weight per layer, applied to every head of that layer
(Qwen3Attention: self.q_norm(q.view(..., head_dim))): they belong to the layer, not to a head, so they stay, as in
the reference. Qwen3-MoE: attention as Qwen3; its MLP is a set of experts chosen per token by a router, where "MLP
column i" names no single neuron, so keys with MLP swaps are refused for it.

A part's place in one tensor is a Member: the tensor's name within a layer, the dimension the block spans, and the
element indices of block b along it: offset + b * width + [0, width) for each offset (GPT-2's fused c_attn holds
q, k and v side by side, so its head blocks have three offsets).

Key sizes are counted as the reference's generators count them (generate_key.py for GPT-Neo, qwen.py's
count_qwen_swappable_params for Llama/Qwen): every moved parameter, except Llama/Qwen q/k/v and MLP biases, which
move with their block but which qwen.py leaves out of its counts. Counting them would make the same fraction give
a different key than the reference's for Qwen2 (one MLP swap more on the test model), so a fraction means the
same in both tools; `key report` also prints every parameter actually moved, biases included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.untrusted import is_int

ATTN_QKV, ATTN_OUT, MLP_UP, MLP_DOWN = "attn_qkv", "attn_out", "mlp_up", "mlp_down"
PARTS = (ATTN_QKV, ATTN_OUT, MLP_UP, MLP_DOWN)
ATTN_HEADS, MLP_COLS = "attn_heads", "mlp_cols"
ATTN_OUT_HEADS, MLP_UP_COLS, MLP_DOWN_COLS = "attn_out_heads", "mlp_up_cols", "mlp_down_cols"
# key list -> the parts one of its swaps moves; in the order the reference's to_dict writes the lists
KEY_KINDS = {ATTN_HEADS: (ATTN_QKV, ATTN_OUT), MLP_COLS: (MLP_UP, MLP_DOWN), ATTN_OUT_HEADS: (ATTN_OUT,),
             MLP_UP_COLS: (MLP_UP,), MLP_DOWN_COLS: (MLP_DOWN,)}
BLOCK_KINDS = tuple(KEY_KINDS)
WHOLE_KINDS = (ATTN_HEADS, MLP_COLS)  # a whole block: moving it within its layer changes nothing
ATTENTION_KINDS = (ATTN_HEADS, ATTN_OUT_HEADS)
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
SUPPORTED_MODEL_TYPES = (*_LLAMA_LIKE, "gpt2", "gpt_neo")


@dataclass(frozen=True)
class Member:
    """Where the blocks of one part lie in one tensor of a layer."""

    suffix: str  # tensor name within a layer, e.g. "self_attn.q_proj.weight"
    dim: int  # the dimension a block spans
    width: int  # elements of one block at each offset
    offsets: tuple[int, ...]
    extent: int  # size of that dimension
    cross: int  # elements per index along dim (the product of the other dimensions)
    counted: bool = True  # in key sizes (the reference's count; see the module docstring)

    def indices(self, blocks: torch.Tensor) -> torch.Tensor:
        """Element indices along dim of the given block numbers, block by block (int64)."""
        span = torch.arange(self.width)
        offsets = torch.tensor(self.offsets)
        return (blocks[:, None, None] * self.width + offsets[None, :, None] + span).reshape(-1)

    @property
    def params_per_block(self) -> int:
        return len(self.offsets) * self.width * self.cross

    def shape_problem(self, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of this shape cannot hold this member's blocks, or None."""
        if len(shape) <= self.dim or shape[self.dim] != self.extent or math.prod(shape) != self.extent * self.cross:
            return (f"has shape {list(shape)}, but the config implies {self.extent} along dimension {self.dim} and "
                    f"{self.extent * self.cross} elements")
        return None


@dataclass(frozen=True)
class BlockKind:
    """One part (attn_qkv, attn_out, mlp_up, mlp_down) of the blocks of a model."""

    name: str
    count: int  # blocks per layer
    members: tuple[Member, ...]

    @property
    def params_per_block(self) -> int:
        return sum(m.params_per_block for m in self.members)

    @property
    def counted_per_block(self) -> int:
        return sum(m.params_per_block for m in self.members if m.counted)


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
    parts: dict[str, BlockKind]  # the parts this architecture has (Qwen3-MoE: attention only)

    def supports(self, kind: str) -> bool:
        return all(part in self.parts for part in KEY_KINDS[kind])

    def count(self, kind: str) -> int:
        """Blocks per layer of a key kind."""
        return self.parts[KEY_KINDS[kind][0]].count

    def params_per_block(self, kind: str) -> int:
        """Parameters one block of a key kind moves, biases included."""
        return sum(self.parts[part].params_per_block for part in KEY_KINDS[kind])

    def counted_per_block(self, kind: str) -> int:
        """Parameters of one block of a key kind in key sizes (the reference's count)."""
        return sum(self.parts[part].counted_per_block for part in KEY_KINDS[kind])

    def swappable(self, kinds: tuple[str, ...] = WHOLE_KINDS) -> int:
        """Parameters of every block of these kinds (the reference's count): what a key of fraction 1 would move."""
        return self.num_layers * sum(self.count(k) * self.counted_per_block(k) for k in kinds if self.supports(k))

    @property
    def swappable_params(self) -> int:
        return self.swappable()


MAX_SIZE = 1 << 20  # of a layer count, head count or width in config.json: far above any real model's


def model_blocks(config: dict, source: str = "config.json") -> ModelBlocks:
    """The block layout of a model from its config.json; source names the file in error messages."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: a model's config must be a mapping (config.json's content), got a "
                              f"{type(config).__name__}")
    model_type = config.get("model_type")
    readers = {**dict.fromkeys(_LLAMA_LIKE, _llama_like), "gpt2": _gpt2, "gpt_neo": _gpt_neo}
    read = readers.get(model_type) if isinstance(model_type, str) else None  # a list or object: no name at all
    if read is None:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported by tier keys "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        blocks = read(config)
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"{source}: cannot read the {model_type} sizes needed for tier keys ({e!r})") from e
    sizes = {"num_hidden_layers": blocks.num_layers, "attention heads": blocks.num_heads,
             "key-value heads": blocks.num_kv_heads, "head dim": blocks.head_dim, "hidden size": blocks.hidden_size,
             "intermediate size": blocks.intermediate_size}
    bad = [f"{name} {value}" for name, value in sizes.items() if not 0 < value <= MAX_SIZE]
    if bad:  # a key's tables grow with them: a count of 10**8 layers would take gigabytes before failing
        raise CheckpointError(f"{source}: {', '.join(bad)}: sizes must be positive and at most {MAX_SIZE:,}")
    return blocks


def _size(value) -> int:
    """A size from config.json, an integer as transformers writes it ("64" or 112.5 are not taken as 64 and 112)."""
    if not is_int(value):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _architecture(config: dict) -> str | None:
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs else None


def _group(heads: int, kv_heads: int) -> int:
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return heads // kv_heads


def published_layout(config: dict, blocks: ModelBlocks) -> ModelBlocks | None:
    """The blocks the reference code gives this model, where they differ from blocks (the module docstring)."""
    if blocks.model_type not in _LLAMA_LIKE or blocks.hidden_size % blocks.num_heads:
        return None  # (the reference refuses such a model: it made no key for it)
    block_dim = blocks.hidden_size // blocks.num_heads
    return None if block_dim == blocks.head_dim else _llama_like(config, block_dim)


def _llama_like(cfg: dict, block_dim: int | None = None) -> ModelBlocks:
    """block_dim: the rows per head of a block, where it is not head_dim (published_layout)."""
    hidden, heads = _size(cfg["hidden_size"]), _size(cfg["num_attention_heads"])
    kv = _size(cfg.get("num_key_value_heads") or heads)
    hd = _size(cfg.get("head_dim") or hidden // heads)
    bd = block_dim or hd
    g = _group(heads, kv)
    qkv_bias = cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias"))
    qkv = [Member("self_attn.q_proj.weight", 0, g * bd, (0,), heads * hd, hidden),
           Member("self_attn.k_proj.weight", 0, bd, (0,), kv * hd, hidden),
           Member("self_attn.v_proj.weight", 0, bd, (0,), kv * hd, hidden)]
    if qkv_bias:
        qkv += [Member(m.suffix.replace(".weight", ".bias"), 0, m.width, (0,), m.extent, 1, counted=False)
                for m in qkv]
    groups = min(kv, kv * hd // bd)  # the blocks inside the tensors (fewer than kv where bd > hd)
    parts = {ATTN_QKV: BlockKind(ATTN_QKV, groups, tuple(qkv)),
             ATTN_OUT: BlockKind(ATTN_OUT, groups, (Member("self_attn.o_proj.weight", 1, g * bd, (0,), heads * hd,
                                                       hidden),))}
    inter = _size(cfg["intermediate_size"])
    if cfg["model_type"] != "qwen3_moe":
        mlp_bias = bool(cfg.get("mlp_bias"))
        up = [Member(f"mlp.{p}_proj.{w}", 0, 1, (0,), inter, hidden if w == "weight" else 1, counted=w == "weight")
              for p in ("gate", "up") for w in (("weight", "bias") if mlp_bias else ("weight",))]
        parts[MLP_UP] = BlockKind(MLP_UP, inter, tuple(up))
        parts[MLP_DOWN] = BlockKind(MLP_DOWN, inter, (Member("mlp.down_proj.weight", 1, 1, (0,), inter, hidden),))
    return ModelBlocks(cfg["model_type"], _architecture(cfg), _size(cfg["num_hidden_layers"]), heads, kv, hd, hidden,
                       inter, parts)


def _gpt2(cfg: dict) -> ModelBlocks:
    # Conv1D weights are stored [in, out]: c_attn and c_fc outputs are columns, c_proj inputs are rows.
    hidden, heads = _size(cfg["n_embd"]), _size(cfg["n_head"])
    inter = _size(cfg.get("n_inner") or 4 * hidden)
    hd = hidden // heads
    qkv = (0, hidden, 2 * hidden)
    parts = {ATTN_QKV: (Member("attn.c_attn.weight", 1, hd, qkv, 3 * hidden, hidden),
                        Member("attn.c_attn.bias", 0, hd, qkv, 3 * hidden, 1)),
             ATTN_OUT: (Member("attn.c_proj.weight", 0, hd, (0,), hidden, hidden),),
             MLP_UP: (Member("mlp.c_fc.weight", 1, 1, (0,), inter, hidden), Member("mlp.c_fc.bias", 0, 1, (0,), inter, 1)),
             MLP_DOWN: (Member("mlp.c_proj.weight", 0, 1, (0,), inter, hidden),)}
    return ModelBlocks("gpt2", _architecture(cfg), _size(cfg["n_layer"]), heads, heads, hd, hidden, inter,
                       _kinds(parts, heads, inter))


def _gpt_neo(cfg: dict) -> ModelBlocks:
    hidden, heads = _size(cfg["hidden_size"]), _size(cfg["num_heads"])
    inter = _size(cfg.get("intermediate_size") or 4 * hidden)
    hd = hidden // heads
    parts = {ATTN_QKV: tuple(Member(f"attn.attention.{p}_proj.weight", 0, hd, (0,), hidden, hidden) for p in "qkv"),
             ATTN_OUT: (Member("attn.attention.out_proj.weight", 1, hd, (0,), hidden, hidden),),
             MLP_UP: (Member("mlp.c_fc.weight", 0, 1, (0,), inter, hidden), Member("mlp.c_fc.bias", 0, 1, (0,), inter, 1)),
             MLP_DOWN: (Member("mlp.c_proj.weight", 1, 1, (0,), inter, hidden),)}
    return ModelBlocks("gpt_neo", _architecture(cfg), _size(cfg["num_layers"]), heads, heads, hd, hidden, inter,
                       _kinds(parts, heads, inter))


def _kinds(parts: dict[str, tuple[Member, ...]], heads: int, inter: int) -> dict[str, BlockKind]:
    return {name: BlockKind(name, heads if name in (ATTN_QKV, ATTN_OUT) else inter, members)
            for name, members in parts.items()}
