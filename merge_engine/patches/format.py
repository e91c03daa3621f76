"""Patch folders: what they hold, and their strict validation against a model before any tensor data is read.

A patch folder holds `patch_config.json` and, for a dense patch, shards `patch-00001.safetensors`, ... A low-rank
patch is a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, loadable by peft) with the
same patch_config.json beside it; any other PEFT LoRA adapter can be applied as a patch too (without the base
check, as it carries no fingerprints).

patch_config.json: {"format": "merge_engine-patch", "version": 1, "storage": one of STORAGES or "lora",
"base": the base folder it was extracted from (informative), "tensors": {name: {"shape": [...], "dtype":
"bfloat16", "base_fingerprint": hex, "tuned_fingerprint": hex, "fixups": k}}}.
Dense shard tensors, for each patched tensor N: float storage `N::delta` (the difference in that dtype, N's
shape); int8/int4 `N::q` and `N::scale` (see arithmetic.py); with k > 0 fixups `N::fix_index` (int32 [k], flat
indices; int64 for tensors of over 2^31 elements), `N::fix_base` and `N::fix_tuned` (N's dtype, [k]).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from merge_engine.dtypes import DTYPES, dtype_name
from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import PATCH_CONFIG, Checkpoint
from merge_engine.io.experts import layout_hint
from merge_engine.io.lora import CONFIG_FILE as ADAPTER_CONFIG
from merge_engine.io.lora import LoraCheckpoint
from merge_engine.io.untrusted import inside_folder, read_json
from merge_engine.patches.arithmetic import (
    FLOATS,
    QUANTIZED,
    STORAGES,
    compute_dtype,
    dequantize_rows,
    index_dtype,
    quantized_shape,
    unpack_int4,
)

FORMAT = "merge_engine-patch"
VERSION = 1
SHARD_STEM = "patch"


@dataclass(frozen=True)
class PatchedTensor:
    """One tensor a patch changes, as patch_config.json describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base_fingerprint: str | None = None  # None: a PEFT adapter made elsewhere
    tuned_fingerprint: str | None = None
    fixups: int = 0

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "base_fingerprint": self.base_fingerprint,
                "tuned_fingerprint": self.tuned_fingerprint, "fixups": self.fixups}


def config_text(storage: str, base: str, tensors: list[PatchedTensor]) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "storage": storage, "base": base,
                       "tensors": {t.name: t.to_json() for t in tensors}}, indent=1) + "\n"


class Patch:
    """A patch opened against one model: which tensors it changes, and each one's difference."""

    path: str
    storage: str
    tensors: dict[str, PatchedTensor]

    def delta(self, name: str) -> torch.Tensor:
        """The stored difference for tensor `name`, in the compute precision of its dtype."""
        raise NotImplementedError

    def fixups(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(flat indices, BASE's values, TUNED's values) where scale 1 needs them, or None."""
        return None

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.storage}, {len(self.tensors)} tensors)"


def open_patch(path: str, model: Checkpoint) -> Patch:
    """The patch folder at `path`, checked against the model's tensor names, shapes and dtypes."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a patch folder (patch_config.json, or a PEFT LoRA adapter)")
    has_config = os.path.exists(os.path.join(path, PATCH_CONFIG))
    if os.path.exists(os.path.join(path, ADAPTER_CONFIG)):
        return LowRankPatch(path, model, read_patch_config(path) if has_config else None)
    if not has_config:
        raise not_a_patch(path)
    return DensePatch(path, model, read_patch_config(path))


def not_a_patch(path: str) -> CheckpointError:
    """The error for a folder given as a patch that holds neither a patch nor an adapter (a model folder, often)."""
    found = "a model folder (config.json)" if os.path.exists(os.path.join(path, "config.json")) else "no patch"
    return CheckpointError(f"{path}: {found}, where a patch is expected: a merge_engine patch has {PATCH_CONFIG}, a "
                           f"PEFT LoRA adapter {ADAPTER_CONFIG} (`merge-engine patch extract BASE TUNED OUT` makes a "
                           "patch of a fine-tuned model)")


class PatchShards(Checkpoint):
    """A dense patch folder's shards, read as a checkpoint's (by its index where there are several)."""

    holds_patch = True


def read_patch_config(path: str) -> tuple[str, dict[str, PatchedTensor]]:
    """(storage, tensors) from a folder's patch_config.json; every field checked, the file named on error."""
    file = inside_folder(path, PATCH_CONFIG, path)
    config = read_json(file)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: {why}")

    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise bad(f"not a merge_engine patch config (its \"format\" must be {FORMAT!r})")
    if config.get("version") != VERSION:
        raise bad(f"version {config.get('version')!r}; this merge_engine reads version {VERSION}")
    storage = config.get("storage")
    if storage not in (*STORAGES, "lora"):
        raise bad(f"storage {storage!r} is not one of {', '.join((*STORAGES, 'lora'))}")
    entries = config.get("tensors")
    if not isinstance(entries, dict) or not entries:
        raise bad("\"tensors\" must map the patched tensor names to their descriptions")
    return storage, {name: _patched_tensor(name, e, bad) for name, e in entries.items()}


def _patched_tensor(name: str, e, bad) -> PatchedTensor:
    def fingerprint(key):
        value = e.get(key)
        if not (isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)):
            raise bad(f"tensor '{name}': {key} must be 32 hex digits")
        return value

    if not isinstance(e, dict):
        raise bad(f"tensor '{name}': its description must be an object")
    shape, dtype, fixups = e.get("shape"), e.get("dtype"), e.get("fixups")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape)):
        raise bad(f"tensor '{name}': shape must be a non-empty list of sizes")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # (a list or object cannot be looked up)
        raise bad(f"tensor '{name}': dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not (isinstance(fixups, int) and not isinstance(fixups, bool) and fixups >= 0):
        raise bad(f"tensor '{name}': fixups must be a count")
    return PatchedTensor(name, tuple(shape), DTYPES[dtype], fingerprint("base_fingerprint"),
                         fingerprint("tuned_fingerprint"), fixups)


def check_against_model(patch_path: str, tensors: dict[str, PatchedTensor], model: Checkpoint) -> None:
    for t in tensors.values():
        info = model.tensors.get(t.name)
        if info is None:
            raise CheckpointError(f"{patch_path}: patches tensor '{t.name}', which {model.path} does not have"
                                  + layout_hint(t.name, model.tensors))
        if info.shape != t.shape or info.dtype != t.dtype:
            raise CheckpointError(f"{patch_path}: tensor '{t.name}' was {dtype_name(t.dtype)} {list(t.shape)} in the "
                                  f"patch's base but is {dtype_name(info.dtype)} {list(info.shape)} in {model.path}")


class DensePatch(Patch):
    """A dense patch folder: differences stored whole (float) or quantized per row (int8, int4)."""

    def __init__(self, path: str, model: Checkpoint, config: tuple[str, dict[str, PatchedTensor]]):
        self.path = path
        self.storage, self.tensors = config
        if self.storage == "lora":  # a low-rank patch is its adapter: without it there is nothing to read
            raise CheckpointError(f"{path}: {PATCH_CONFIG} says storage 'lora' but the folder has no {ADAPTER_CONFIG}")
        check_against_model(path, self.tensors, model)
        self._files = PatchShards(path)
        self._check_stored()

    def _expected(self, t: PatchedTensor) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if self.storage in FLOATS:
            stored = {"delta": (FLOATS[self.storage], t.shape)}
        else:
            q_shape = quantized_shape(t.shape, self.storage)
            stored = {"q": (torch.int8 if self.storage == "int8" else torch.uint8, q_shape),
                      "scale": (torch.float32, (q_shape[0],))}
        if t.fixups:
            stored |= {"fix_index": (index_dtype(math.prod(t.shape)), (t.fixups,)), "fix_base": (t.dtype, (t.fixups,)),
                       "fix_tuned": (t.dtype, (t.fixups,))}
        return {f"{t.name}::{part}": spec for part, spec in stored.items()}

    def _check_stored(self) -> None:
        expected = {k: v for t in self.tensors.values() for k, v in self._expected(t).items()}
        for key, (dtype, shape) in expected.items():
            info = self._files.tensors.get(key)
            if info is None:
                raise CheckpointError(f"{self.path}: the shards lack '{key}', which {PATCH_CONFIG} implies")
            if info.dtype != dtype or info.shape != shape:
                raise CheckpointError(f"{info.file}: '{key}' is {dtype_name(info.dtype)} {list(info.shape)}; "
                                      f"{PATCH_CONFIG} implies {dtype_name(dtype)} {list(shape)}")
        extra = sorted(set(self._files.tensors) - set(expected))
        if extra:
            raise CheckpointError(f"{self._files.tensors[extra[0]].file}: holds '{extra[0]}', which {PATCH_CONFIG} "
                                  "does not describe")

    def delta(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        wide = compute_dtype(t.dtype)
        if self.storage in FLOATS:
            delta, stored = self._files.read(f"{name}::delta").to(wide), f"'{name}::delta'"
        else:
            q, scale = self._files.read(f"{name}::q"), self._files.read(f"{name}::scale")
            self._check_quantized(name, q, scale, t.shape)
            delta, stored = dequantize_rows(q, scale, self.storage, t.shape).to(wide), f"'{name}::scale'"
        # extract stores finite differences: NaN or Inf means a damaged file (a sum, one pass without a mask,
        # is finite when every value is, short of an overflow, which the full test then clears)
        if not math.isfinite(float(delta.sum())) and not bool(torch.isfinite(delta).all()):
            raise CheckpointError(f"{self.path}: {stored} holds NaN or Inf values (a damaged patch)")
        return delta

    def _check_quantized(self, name: str, q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> None:
        """What extract never writes, so a damaged file: a negative scale (a row's max |d| / qmax), or a value
        outside [-qmax, qmax] (int8's -128, int4's -8)."""
        qmax = QUANTIZED[self.storage]
        values = unpack_int4(q, math.prod(shape) // max(scale.numel(), 1)) if self.storage == "int4" else q
        if bool((scale < 0).any()) or bool(((values < -qmax) | (values > qmax)).any()):  # (int8 abs(-128) wraps)
            raise CheckpointError(f"{self.path}: '{name}::scale' or '{name}::q' holds a negative scale or a value "
                                  f"outside [-{qmax}, {qmax}] (a damaged patch)")

    def fixups(self, name: str):
        t = self.tensors[name]
        if not t.fixups:
            return None
        index = self._files.read(f"{name}::fix_index").long()
        numel = torch.Size(t.shape).numel()
        if int(index.min()) < 0 or int(index.max()) >= numel:
            raise CheckpointError(f"{self.path}: '{name}::fix_index' holds indices outside the tensor's {numel}")
        if index.unique().numel() != index.numel():
            raise CheckpointError(f"{self.path}: '{name}::fix_index' holds an index twice (a damaged patch)")
        values = [self._files.read(f"{name}::fix_{part}") for part in ("base", "tuned")]
        for part, v in zip(("base", "tuned"), values):
            if not bool(torch.isfinite(v).all()):  # extract refuses non-finite weights: a damaged file
                raise CheckpointError(f"{self.path}: '{name}::fix_{part}' holds NaN or Inf values (a damaged patch)")
        return index, *values

    def check_unchanged(self) -> None:
        self._files.check_unchanged()

    def close(self) -> None:
        self._files.close()


class LowRankPatch(Patch):
    """A PEFT LoRA adapter as a patch: each target's difference is peft's B @ A * scaling (io/lora.py)."""

    def __init__(self, path: str, model: Checkpoint, config: tuple[str, dict[str, PatchedTensor]] | None):
        self.path = path
        self.storage = "lora"
        self._adapter = LoraCheckpoint(model.path, path, headers=model)  # validates the adapter against the model's headers
        replaced = [n for n, t in self._adapter.targets.items() if t.replacement]
        if replaced:
            raise CheckpointError(f"{path}: replaces whole tensors (modules_to_save, e.g. '{replaced[0]}'), which "
                                  "cannot be scaled or removed; merge it as BASE+ADAPTER instead")
        if config is not None:
            if config[0] != "lora":  # beside an adapter, the patch is low rank whatever the file says
                raise CheckpointError(f"{path}: {PATCH_CONFIG} says storage {config[0]!r} beside a PEFT adapter, "
                                      "whose patch is low rank ('lora')")
            self.tensors = config[1]
            check_against_model(path, self.tensors, model)
            if set(self.tensors) != set(self._adapter.targets):
                raise CheckpointError(f"{path}: {PATCH_CONFIG} and the adapter's weights name different tensors")
        else:
            self.tensors = {n: PatchedTensor(n, model.tensors[n].shape, model.tensors[n].dtype)
                            for n in self._adapter.targets}

    def delta(self, name: str) -> torch.Tensor:
        return self._adapter.delta(name, self.tensors[name].dtype).to(compute_dtype(self.tensors[name].dtype))

    def close(self) -> None:
        self._adapter.close()
