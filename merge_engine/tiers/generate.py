"""Key generation from a secret: the same secret and model give the same key, on any machine.

Algorithm, version 1 (fixed, so that other implementations can reproduce keys):
1. seed = scrypt(secret, salt=b"merge_engine.tier_key.v1", N=2**15, r=8, p=1, 32 bytes): a standard memory-hard KDF
   from the standard library, so that guessing a passphrase from a published keyed model is slow.
2. Per block kind, a byte stream in counter mode (NIST SP 800-108): the concatenation, for counter = 0, 1, ..., of
   HMAC-SHA256(seed, kind name + b"\\0" + counter as 8 bytes big-endian).
3. An integer uniform below n: the next ceil(b / 8) bytes, big-endian, masked to their low b = bitlen(n - 1) bits;
   rejected and drawn again while >= n (so unbiased).
4. Budget: target = int(fraction * swappable parameters) (the parameters of every block of both kinds);
   attention gets int(target * attention_share), MLP the rest; each kind gets its target // (2 * parameters of one
   block) swaps, as the reference does.
5. Blocks are numbered layer * blocks_per_layer + index. Each swap draws its first block uniformly among the unused
   ones (a sparse Fisher-Yates shuffle), then its partner uniformly among unused blocks of other layers (drawn again
   while in the same layer): permuting blocks within one layer is a symmetry of that layer and would key nothing.
"""
from __future__ import annotations

import hashlib
import hmac

from merge_engine.tiers.blocks import BLOCK_KINDS, BlockKind, model_blocks
from merge_engine.tiers.key import Swap, TierKey, TierKeyError, key_meta

KDF_SALT = b"merge_engine.tier_key.v1"
KDF_PARAMS = {"n": 2**15, "r": 8, "p": 1, "dklen": 32, "maxmem": 64 * 1024 * 1024}


def derive_seed(secret: bytes | str) -> bytes:
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


def generate_key(config: dict, secret: bytes | str, fraction: float = 0.05, attention_share: float = 0.25,
                 source: str = "config.json") -> TierKey:
    """A key for the model described by config.json (a dict; source names it in messages)."""
    if not 0 < fraction <= 1:
        raise TierKeyError(f"fraction must be in (0, 1], got {fraction}")
    if not 0 <= attention_share <= 1:
        raise TierKeyError(f"attention share must be in [0, 1], got {attention_share}")
    blocks = model_blocks(config, source)
    target = int(blocks.swappable_params * fraction)
    attn_target = int(target * attention_share)
    targets = {BLOCK_KINDS[0]: attn_target, BLOCK_KINDS[1]: target - attn_target}
    seed = derive_seed(secret)
    swaps = {kind: draw_swaps(ByteStream(seed, kind), blocks.kinds[kind], blocks.num_layers,
                              targets[kind] // (2 * blocks.kinds[kind].params_per_block), source)
             for kind in BLOCK_KINDS}
    return TierKey(swaps[BLOCK_KINDS[0]], swaps[BLOCK_KINDS[1]], key_meta(blocks), source="<generated key>")


def draw_swaps(stream: ByteStream, kind: BlockKind, num_layers: int, n_swaps: int, source: str) -> tuple[Swap, ...]:
    """n_swaps cross-layer swaps of distinct blocks, drawn without replacement."""
    total = num_layers * kind.count
    if n_swaps and (num_layers < 2 or 2 * n_swaps > total):
        raise TierKeyError(f"{source}: cannot draw {n_swaps} cross-layer {kind.name} swaps from {num_layers} layer(s) "
                           f"of {kind.count} blocks; lower the fraction or the attention share")
    shuffled: dict[int, int] = {}  # sparse Fisher-Yates: position -> block, where it differs from the identity
    left = [kind.count] * num_layers  # unused blocks per layer
    used = 0

    def take(position: int) -> int:
        nonlocal used
        block = shuffled.get(position, position)
        shuffled[position] = shuffled.get(used, used)
        used += 1
        left[block // kind.count] -= 1
        return block

    swaps = []
    for _ in range(n_swaps):
        a = take(used + stream.below(total - used))
        if total - used == left[a // kind.count]:
            raise TierKeyError(f"{source}: only blocks of layer {a // kind.count} are left to pair; lower the fraction")
        while True:
            position = used + stream.below(total - used)
            b = shuffled.get(position, position)
            if b // kind.count != a // kind.count:
                break
        take(position)
        swaps.append((divmod(a, kind.count), divmod(b, kind.count)))
    return tuple(swaps)
