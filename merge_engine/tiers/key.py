"""Tier keys: the JSON file format and the checks of a key against a model.

The format is the published reference's (McGill-NLP/tiered-language-models, PermutationKey.from_dict): a JSON
object with lists of swaps, each swap two blocks [layer, index]:

    {"attn_heads": [[[0, 3], [2, 1]], ...], "mlp_cols": [[[0, 1359], [1, 5026]], ...]}

and optionally the partial lists attn_out_heads, mlp_up_cols and mlp_down_cols (blocks.py says what each moves).
A key's swaps must be disjoint part by part: no block part in two swaps, which also forbids a whole swap and a
partial one sharing a part (an mlp_cols and an mlp_up_cols swap of the same column), since their result would
depend on the order they are applied in. The reference's validate_key lets such keys through; its generator never
makes them.

Keys written here add optional metadata, so that a key used on the wrong model is refused rather than silently
scrambling it: "format": "merge_engine.tier_key", "version": 1, "model_type", "architecture", "num_layers",
"num_heads", "num_kv_heads", "intermediate_size". Readers of either side ignore fields they do not know (the
reference reads with dict.get), so keys travel both ways unchanged. On grouped-query models an attn_heads index is
a KV group (see blocks.py); on multi-head models, the reference's models included, it is a head.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import logging
import os
import re
import reprlib
import secrets
import warnings
from dataclasses import dataclass, field

from merge_engine.errors import CheckpointError, MergeEngineError
from merge_engine.io.untrusted import open_regular, parse_json
from merge_engine.io.writer import lock_is_free, process_running
from merge_engine.tiers.blocks import ATTENTION_KINDS, BLOCK_KINDS, KEY_KINDS, WHOLE_KINDS, ModelBlocks
from merge_engine.tiers.permutation import Block, BlockPermutation

FORMAT = "merge_engine.tier_key"
VERSION = 1
MAX_KEY_BYTES = 256 * 2**20
# a save's temporary file beside the key: the process id names its owner (_remove_stale_partials)
_PARTIAL = re.compile(r"\.key-(\d+)\.[0-9a-f]{8}\.partial")
_MADE_HERE: set[str] = set()  # the temporary files this process' saves made
log = logging.getLogger("merge_engine")
META_FIELDS = ("model_type", "architecture", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
# Not "architecture": a ...ForCausalLM and a ...ForSequenceClassification share their layers.
_CHECKED_META = ("model_type", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")

Swap = tuple[Block, Block]


class TierKeyError(MergeEngineError):
    """A key file that cannot be read, or a key that does not fit the model it is used with."""


@dataclass(frozen=True)
class TierKey:
    """Disjoint swaps of blocks (whole heads and MLP columns, or parts of them: blocks.py), with optional metadata
    about the model."""

    attn_heads: tuple[Swap, ...] = ()
    mlp_cols: tuple[Swap, ...] = ()
    meta: dict = field(default_factory=dict)  # META_FIELDS present in the file or set at generation
    source: str = field(default="<key>", compare=False)  # the file it was read from, for messages
    attn_out_heads: tuple[Swap, ...] = ()
    mlp_up_cols: tuple[Swap, ...] = ()
    mlp_down_cols: tuple[Swap, ...] = ()
    published: bool = field(default=False, compare=False)  # read from a file without our "format" field

    def __post_init__(self):
        owner: dict[tuple[str, Block], tuple[str, int]] = {}  # (part, block) -> the swap that moves it
        for kind in BLOCK_KINDS:  # lists (as in JSON) become tuples
            object.__setattr__(self, kind, tuple((tuple(a), tuple(b)) for a, b in getattr(self, kind)))
            for i, swap in enumerate(self.swaps(kind)):
                for part in KEY_KINDS[kind]:
                    for block in swap:
                        if (part, block) in owner:
                            raise TierKeyError(f"{self.source}: {self._swap_name(kind, i)} overlaps "
                                               f"{self._swap_name(*owner[part, block])}: both move the {part} part "
                                               f"of block {list(block)} (a key's swaps must be disjoint)")
                        owner[part, block] = kind, i

    def _swap_name(self, kind: str, i: int) -> str:
        return f"{kind}[{i}] {json.dumps([list(b) for b in self.swaps(kind)[i]])}"

    def swaps(self, kind: str) -> tuple[Swap, ...]:
        return getattr(self, kind)

    def permutation(self) -> BlockPermutation:
        return BlockPermutation.from_swaps({kind: self.swaps(kind) for kind in BLOCK_KINDS})

    def inverse(self) -> TierKey:
        """Disjoint swaps undo themselves."""
        return self

    def to_json(self) -> str:
        """The published format plus our metadata (none for a key read without it, which keeps its meaning:
        tiers/apply.py keyed_layout); one swap per line."""
        ours = {} if self.published else {"format": FORMAT, "version": VERSION}
        head = {**ours, **{k: self.meta[k] for k in META_FIELDS if k in self.meta}}
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
        for kind in (k for k in BLOCK_KINDS if k in WHOLE_KINDS or self.swaps(k)):  # as the reference's to_dict
            swaps = ",\n".join(f"    {json.dumps([list(a), list(b)])}" for a, b in self.swaps(kind))
            lines.append(f"  {json.dumps(kind)}: " + (f"[\n{swaps}\n  ]" if swaps else "[]"))
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<key>") -> TierKey:
        """Read our format or the published one (no metadata); extra fields are ignored."""
        try:
            data = parse_json(text, f"{source}: not a tier key")
        except CheckpointError as e:
            raise TierKeyError(str(e)) from None
        if not isinstance(data, dict) or not any(k in data for k in (*BLOCK_KINDS, "format")):
            raise TierKeyError(f"{source}: not a tier key (expected a JSON object with lists "
                               f"{' and '.join(BLOCK_KINDS)})")
        _check_format(data, source)
        misspelt = _warn_unknown_fields(data, source)
        swaps = {kind: _read_swaps(data.get(kind, []), kind, source) for kind in BLOCK_KINDS}
        if misspelt and not any(swaps.values()):  # it would apply as the identity: a copy, not a tier
            raise TierKeyError(f"{source}: swaps nothing, but has {', '.join(map(reprlib.repr, misspelt))}: a "
                               "misspelt swap list?")
        meta = {k: data[k] for k in META_FIELDS if data.get(k) is not None}
        return cls(meta=meta, source=source, published="format" not in data, **swaps)

    @classmethod
    def load(cls, path: str) -> TierKey:
        try:
            with open_regular(path) as f:  # a FIFO would block forever
                if os.fstat(f.fileno()).st_size > MAX_KEY_BYTES:  # refused by its size, unread
                    raise _too_large(path)
                raw = f.read(MAX_KEY_BYTES + 1)
            if len(raw) > MAX_KEY_BYTES:  # (it grew meanwhile)
                raise _too_large(path)
            text = raw.decode("utf-8")
        except CheckpointError as e:
            raise TierKeyError(f"{path}: cannot read key file ({str(e).removeprefix(f'{path}: ')})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TierKeyError(f"{path}: cannot read key file ({e})") from e
        return cls.from_json(text, source=path)

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write atomically, readable by the owner only: the key is the secret."""
        if os.path.exists(path) and not overwrite:
            raise TierKeyError(f"{path}: key file exists; pass --overwrite (overwrite=True) to replace it")
        folder, tmp = os.path.dirname(path) or ".", None
        try:
            _remove_stale_partials(folder)
            fd, tmp = _make_partial(folder)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise TierKeyError(f"{path}: cannot write key file ({e})") from e
        finally:
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
            _MADE_HERE.discard(tmp)


def _make_partial(folder: str) -> tuple[int, str]:
    """A new owner-only temporary file in folder and its path: a short name (PATH.partial passes 255 bytes for a
    long PATH) with this process' id, flock-ed until written (the lock keeps it from a process on another host that
    shares the disk, where the id means nothing)."""
    while True:
        tmp = os.path.join(folder, f".key-{os.getpid()}.{secrets.token_hex(4)}.partial")
        _MADE_HERE.add(tmp)  # before it exists: another thread's save must not take it for a killed one's
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, tmp


def _remove_stale_partials(folder: str) -> None:
    """Remove the temporary files that saves killed while writing (SIGKILL, the OOM killer) left in folder: a
    file is stale when its process id is not running here (or is this process', which did not make it: a
    container's runs all get the same one) and no process holds its lock, as the merge's partial folders are."""
    for name in sorted(os.listdir(folder)):
        match = _PARTIAL.fullmatch(name)
        path = os.path.join(folder, name)
        if not match or os.path.islink(path) or not os.path.isfile(path):
            continue
        pid = int(match[1])
        running = path in _MADE_HERE if pid == os.getpid() else process_running(pid)
        if not running and lock_is_free(path):
            with contextlib.suppress(FileNotFoundError):  # another save removed it meanwhile
                os.unlink(path)
                log.warning("removed %s, the unfinished key file of an earlier run that was killed", path)


def _too_large(path: str) -> TierKeyError:
    return TierKeyError(f"{path}: more than {MAX_KEY_BYTES // 2**20} MiB, not a tier key (a key swapping every block "
                        "of a 400B-parameter model takes under 200 MiB)")


def _warn_unknown_fields(data: dict, source: str) -> list[str]:
    """Fields neither format reads are ignored, as the reference's dict.get does; named, since a misspelt list
    ("mlp_col") would otherwise vanish from the key without a word. Returns those that look like a swap list's."""
    known = (*BLOCK_KINDS, *META_FIELDS, "format", "version")
    misspelt = []
    for name in (k for k in data if k not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        warnings.warn(f"{source}: field {reprlib.repr(name)} is not part of a tier key{hint}: ignored")
        misspelt += [name] if close and close[0] in BLOCK_KINDS else []
    return misspelt


def _check_format(data: dict, source: str) -> None:
    if "format" in data and data["format"] != FORMAT:
        raise TierKeyError(f"{source}: unknown key format {data['format']!r} (expected {FORMAT!r})")
    version = data.get("version", VERSION)
    if type(version) is not int or version < 1:
        raise TierKeyError(f"{source}: version must be a positive integer, got {version!r}")
    if version > VERSION:
        raise TierKeyError(f"{source}: key format version {version!r} is newer than this merge_engine reads "
                           f"({VERSION}); upgrade merge_engine")


def _read_swaps(raw, kind: str, source: str) -> tuple[Swap, ...]:
    if not isinstance(raw, list):
        raise TierKeyError(f"{source}: {kind} must be a list of swaps [[layer, index], [layer, index]]")
    swaps = []
    for i, swap in enumerate(raw):
        try:
            (la, ia), (lb, ib) = swap
            if not all(type(v) is int and v >= 0 for v in (la, ia, lb, ib)):
                raise ValueError
        except (TypeError, ValueError):
            raise TierKeyError(f"{source}: {kind}[{i}] = {json.dumps(swap)} is not a swap "
                               "[[layer, index], [layer, index]] of non-negative integers") from None
        if (la, ia) == (lb, ib):
            raise TierKeyError(f"{source}: {kind}[{i}] swaps block {[la, ia]} with itself")
        swaps.append(((la, ia), (lb, ib)))
    return tuple(swaps)


def key_meta(blocks: ModelBlocks) -> dict:
    """The metadata a key made for this model carries."""
    meta = {"model_type": blocks.model_type, "architecture": blocks.architecture, "num_layers": blocks.num_layers,
            "num_heads": blocks.num_heads, "num_kv_heads": blocks.num_kv_heads,
            "intermediate_size": blocks.intermediate_size}
    return {k: v for k, v in meta.items() if v is not None}


def validate_key(key: TierKey, blocks: ModelBlocks, model: str) -> None:
    """Refuse a key made for another model (metadata) or whose blocks fall outside this one (indices)."""
    expected = key_meta(blocks)
    for name in _CHECKED_META:
        if name in key.meta and name in expected and key.meta[name] != expected[name]:
            raise TierKeyError(f"{key.source}: key is for a model with {name} {key.meta[name]!r}, but {model} has "
                               f"{name} {expected[name]!r}")
    for kind in BLOCK_KINDS:
        if not key.swaps(kind):
            continue
        if not blocks.supports(kind):
            raise TierKeyError(f"{key.source}: {kind} swaps are not supported on {blocks.model_type} ({model}): its "
                               "MLP is a mixture of experts, where an MLP column names no single neuron")
        count = blocks.count(kind)
        gqa = kind in ATTENTION_KINDS and blocks.num_kv_heads < blocks.num_heads
        what = "KV group" if gqa else "head" if kind in ATTENTION_KINDS else "MLP column"
        note = " (on grouped-query models a head block is a whole KV group)" if gqa else ""
        if kind in ATTENTION_KINDS and count < blocks.num_kv_heads:  # blocks.published_layout
            note = (f" (the published code's blocks of hidden_size / num_attention_heads rows, of which only {count} "
                    "fit in its tensors)")
        for i, swap in enumerate(key.swaps(kind)):
            for layer, index in swap:
                if layer >= blocks.num_layers:
                    raise TierKeyError(f"{key.source}: {kind}[{i}] names layer {layer}, but {model} has "
                                       f"{blocks.num_layers} layers")
                if index >= count:
                    raise TierKeyError(f"{key.source}: {kind}[{i}] names {what} {index}, but {model} has {count} "
                                       f"per layer{note}")
