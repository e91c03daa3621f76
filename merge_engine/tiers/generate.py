"""Key generation from a secret: the same secret and model give the same key, on any machine.

Algorithm, version 1 (fixed, so that other implementations can reproduce keys):
1. seed = scrypt(secret, salt=b"merge_engine.tier_key.v1", N=2**15, r=8, p=1, 32 bytes): a standard memory-hard KDF
   from the standard library, so that guessing a passphrase from a published keyed model is slow.
2. Per block kind, a byte stream in counter mode (NIST SP 800-108): the concatenation, for counter = 0, 1, ..., of
   HMAC-SHA256(seed, kind name + b"\\0" + counter as 8 bytes big-endian).
3. An integer uniform below n: the next ceil(b / 8) bytes, big-endian, masked to their low b = bitlen(n - 1) bits;
   rejected and drawn again while >= n (so unbiased).
4. Budget, as the reference's generators compute it (scripts/keys/generate_key.py; qwen.py for Llama/Qwen): one
   attention kind (attn_heads, or attn_out_heads with attn_mode "out") and one MLP kind (mlp_cols, or mlp_up_cols /
   mlp_down_cols with mlp_mode "up" / "down"); swappable = the parameters of every block of those two kinds, counted
   as blocks.py says. With fraction_of "swappable", pct = fraction; with "model", pct = fraction * total parameters
   / swappable (the reference's --target_total_pct conversion). target = int(swappable * pct); attention gets
   int(target * attention_share), MLP the rest (on Llama/Qwen, all of it when that attention share is too small for
   one swap, as qwen.py does); each kind gets its target // (2 * parameters of one block) swaps.
5. Blocks are numbered layer * blocks_per_layer + index. Each swap draws its first block uniformly among the unused
   ones (a sparse Fisher-Yates shuffle), then its partner uniformly among the unused ones; for whole blocks
   (attn_heads, mlp_cols) among those of other layers (drawn again while in the same layer): permuting whole blocks
   within one layer is a symmetry of that layer and would key nothing. A partial swap changes the model within a
   layer too, so its partner may be in any layer, as in the reference.
"""
from __future__ import annotations

import hashlib
import hmac
import os

import torch

from merge_engine.extras import BUILDING_TRANSFORMERS_MODEL, require, transformers_config_errors
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.tiers.blocks import (
    ATTN_HEADS,
    ATTN_OUT_HEADS,
    MLP_COLS,
    MLP_DOWN_COLS,
    MLP_UP_COLS,
    WHOLE_KINDS,
    ModelBlocks,
    model_blocks,
)
from merge_engine.tiers.key import MAX_KEY_BYTES, Swap, TierKey, TierKeyError, key_meta

KDF_SALT = b"merge_engine.tier_key.v1"
KDF_PARAMS = {"n": 2**15, "r": 8, "p": 1, "dklen": 32, "maxmem": 64 * 1024 * 1024}
ATTN_MODES = {"full": ATTN_HEADS, "out": ATTN_OUT_HEADS}  # the reference generator's --attn_mode
MLP_MODES = {"both": MLP_COLS, "up": MLP_UP_COLS, "down": MLP_DOWN_COLS}  # and --mlp_mode
FRACTION_OF = ("swappable", "model")


def derive_seed(secret: bytes | str) -> bytes:
    if not isinstance(secret, (str, bytes, bytearray)):
        raise TierKeyError(f"the secret must be a string or bytes, got a {type(secret).__name__}")
    secret = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not secret:
        raise TierKeyError("the secret is empty")
    return hashlib.scrypt(secret, salt=KDF_SALT, **KDF_PARAMS)


class ByteStream:
    """HMAC-SHA256 in counter mode over a seed, domain-separated by a label."""

    def __init__(self, seed: bytes, label: str):
        self._seed, self._label = seed, label.encode() + b"\0"
        self._counter = 0
        self._buffer = b""

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            block = hmac.new(self._seed, self._label + self._counter.to_bytes(8, "big"), hashlib.sha256).digest()
            self._buffer += block
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def below(self, n: int) -> int:
        """Uniform integer in [0, n), by rejection."""
        bits = (n - 1).bit_length()
        while True:
            x = int.from_bytes(self.read((bits + 7) // 8), "big") & ((1 << bits) - 1)
            if x < n:
                return x


MAX_SWAPS = MAX_KEY_BYTES // 22  # a swap takes at least 22 bytes of the key file ("    [[0, 0], [1, 0]],\n")


def generate_key(config: dict, secret: bytes | str, fraction: float = 0.05, attention_share: float = 0.25,
                 source: str = "config.json", *, fraction_of: str = "swappable", total_params: int | None = None,
                 attn_mode: str = "full", mlp_mode: str = "both") -> TierKey:
    """A key for the model described by config.json (a dict; source names it in messages).

    fraction counts the swappable parameters (fraction_of="swappable", the reference's --target_pct) or all the
    model's (fraction_of="model", its --target_total_pct; total_params is then required: the model's parameter
    count, tied weights once). attn_mode "full" | "out" and mlp_mode "both" | "up" | "down" choose whole or
    partial swaps, as the reference generator's --attn_mode and --mlp_mode do."""
    if not 0 < fraction <= 1:
        raise TierKeyError(f"fraction must be in (0, 1], got {fraction}")
    if not 0 <= attention_share <= 1:
        raise TierKeyError(f"attention share must be in [0, 1], got {attention_share}")
    for name, value, allowed in (("fraction_of", fraction_of, FRACTION_OF), ("attn_mode", attn_mode, ATTN_MODES),
                                 ("mlp_mode", mlp_mode, MLP_MODES)):
        if value not in allowed:
            raise TierKeyError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if fraction_of == "model" and not (isinstance(total_params, int) and total_params > 0):
        raise TierKeyError("a fraction of the model needs the model's parameter count (total_params)")
    blocks = model_blocks(config, source)
    kinds = (ATTN_MODES[attn_mode], MLP_MODES[mlp_mode])
    counts = swap_counts(blocks, kinds, fraction * total_params / blocks.swappable(kinds)
                         if fraction_of == "model" else fraction, attention_share, source)
    if sum(counts.values()) > MAX_SWAPS:  # drawn, they would fill memory; written, pass the key-file limit
        raise TierKeyError(f"{source}: {sum(counts.values()):,} swaps make a key larger than a key file may be "
                           f"({MAX_KEY_BYTES // 2**20} MiB); lower the fraction")
    seed = derive_seed(secret)
    swaps = {kind: draw_swaps(ByteStream(seed, kind), kind, blocks.count(kind), blocks.num_layers, n, source)
             for kind, n in counts.items() if n}
    return TierKey(meta=key_meta(blocks), source="<generated key>", **swaps)


def parameter_count(model: str, config: dict) -> int:
    """All parameters of a model, tied weights once: from a model folder's weight file headers (a pickled tied head
    shares its embedding's bytes), or for a config alone by building the model on the meta device (transformers,
    the [hf] extra; no memory is allocated)."""
    if os.path.isdir(model) and any(name.endswith((".safetensors", ".bin")) for name in os.listdir(model)):
        ckpt = Checkpoint(model)
        try:
            stored = {(info.file, info.data_start, info.nbytes): info.numel for info in ckpt.tensors.values()}
            return sum(stored.values())
        finally:
            ckpt.close()
    transformers = require("transformers", "hf", "a key sized as a fraction of the model from a config.json alone")
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with BUILDING_TRANSFORMERS_MODEL, torch.device("meta"):
            built = transformers.AutoModelForCausalLM.from_config(cfg)
    except transformers_config_errors() as e:
        raise TierKeyError(f"{model}: cannot build the model to count its parameters ({e})") from e
    return sum(p.numel() for p in built.parameters())


def swap_counts(blocks: ModelBlocks, kinds: tuple[str, str], pct: float, attention_share: float,
                source: str = "config.json") -> dict[str, int]:
    """Swaps of the attention and MLP kinds for a fraction pct of their swappable parameters (step 4 above)."""
    attn, mlp = kinds
    target = int(blocks.swappable(kinds) * pct)
    attn_target = int(target * attention_share)
    attn_swaps = attn_target // (2 * blocks.counted_per_block(attn))
    mlp_target = target - attn_target
    if blocks.model_type not in ("gpt2", "gpt_neo") and attn_swaps == 0 and attn_target > 0:
        mlp_target = target  # qwen.py's _allocate_qwen_swap_counts
    if not blocks.supports(mlp):
        if attn_target == target > 0 and attn_swaps == 0:  # the share is all attention: only the fraction can help
            raise TierKeyError(f"{source}: a fraction of {pct:g} of the {blocks.swappable(kinds):,} swappable "
                               f"parameters buys no {attn} swap (one moves {2 * blocks.counted_per_block(attn):,}); "
                               "raise the fraction")
        if mlp_target > 0:
            raise TierKeyError(f"{source}: {blocks.model_type} has no {mlp} blocks (its MLP is a mixture of experts); "
                               "use an attention share of 1")
        return {attn: attn_swaps}
    return {attn: attn_swaps, mlp: mlp_target // (2 * blocks.counted_per_block(mlp))}


def draw_swaps(stream: ByteStream, kind: str, count: int, num_layers: int, n_swaps: int,
               source: str) -> tuple[Swap, ...]:
    """n_swaps swaps of distinct blocks of a key kind (count per layer), drawn without replacement; whole blocks
    pair across layers."""
    total = num_layers * count
    cross = kind in WHOLE_KINDS
    if n_swaps and ((cross and num_layers < 2) or 2 * n_swaps > total):
        raise TierKeyError(f"{source}: cannot draw {n_swaps} {'cross-layer ' if cross else ''}{kind} swaps from "
                           f"{num_layers} layer(s) of {count} blocks; lower the fraction or the attention share")
    shuffled: dict[int, int] = {}  # sparse Fisher-Yates: position -> block, where it differs from the identity
    left = [count] * num_layers  # unused blocks per layer
    used = 0

    def take(position: int) -> int:
        nonlocal used
        block = shuffled.get(position, position)
        shuffled[position] = shuffled.get(used, used)
        used += 1
        left[block // count] -= 1
        return block

    swaps = []
    for _ in range(n_swaps):
        a = take(used + stream.below(total - used))
        if cross and total - used == left[a // count]:
            raise TierKeyError(f"{source}: only blocks of layer {a // count} are left to pair; lower the fraction")
        while True:
            position = used + stream.below(total - used)
            b = shuffled.get(position, position)
            if not cross or b // count != a // count:
                break
        take(position)
        swaps.append((divmod(a, count), divmod(b, count)))
    return tuple(swaps)
