"""The Grams folder format (written by `merge-engine stats`, merge_engine/stats/gram.py; read by RegMean
and BMM, merge_engine/methods/regression.py): how a Gram is stored, and the validated manifest.

A folder of safetensors shards, one tensor per Gram named `<module>.gram` after the first module that
reads it ([d, d] in fp32 or bf16, or its upper triangle packed row by row, d (d + 1) / 2 entries, when
`packed`), and `grams.json`:
    {"format": "merge_engine.grams", "version": 1, "model": ..., "examples": N, "tokens": T,
     "dtype": "float32" | "bfloat16", "packed": bool, "max_length": L,
     "modules": {module: {"gram": tensor name, "in_features": d, "transposed": bool, "rows": n}}}
`tokens` counts the real tokens of the data; a module's `rows` the input rows its Gram summed (its
tokens, or one per example for a pooler or classification head, which reads one vector per example);
`transposed` marks modules whose weight is stored [in, out] (GPT-2's Conv1D), not [out, in] (nn.Linear).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from merge_engine.dtypes import DTYPES, STATS_DTYPES
from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.safetensors_format import folder_identity
from merge_engine.io.untrusted import inside_folder, read_json
from merge_engine.ops.gram import pack_upper, unpack_upper

MANIFEST_FILE = "grams.json"
MANIFEST_FORMAT = "merge_engine.grams"
MANIFEST_VERSION = 1


def stored_shape(d: int, packed: bool) -> tuple[int, ...]:
    """Shape of a stored [d, d] Gram: its packed upper triangle, or the whole matrix."""
    return (d * (d + 1) // 2,) if packed else (d, d)


def to_stored(gram: torch.Tensor, dtype: str, packed: bool) -> torch.Tensor:
    """A mirrored fp32 Gram as stored: packed when asked, in the storage dtype, on the CPU."""
    return (pack_upper(gram) if packed else gram).to(DTYPES[dtype]).cpu()


def as_matrix(stored: torch.Tensor, d: int) -> torch.Tensor:
    """A stored Gram (full or packed, any dtype) as an fp32 [d, d] matrix."""
    return stored.float() if stored.dim() == 2 else unpack_upper(stored, d, torch.float32)


SYMMETRY_TOLERANCE = 1e-4  # relative to the largest entry: far above an fp32 X^T X's rounding, far below a wrong matrix


def gram_problem(gram: torch.Tensor) -> str | None:
    """Why a [d, d] matrix cannot be a Gram X^T X (a sum of squares on its diagonal, symmetric), or None. A
    solve would take either silently: a Cholesky reads only one triangle, a negative diagonal gets jitter."""
    negative = int((torch.diagonal(gram) < 0).sum())
    if negative:
        return f"has {negative} negative diagonal entr{'y' if negative == 1 else 'ies'} (sums of squares)"
    largest, asymmetry = float(gram.abs().max()), float((gram - gram.T).abs().max())  # d >= 1 (the manifest's)
    if asymmetry > SYMMETRY_TOLERANCE * largest:
        return f"is not symmetric (entries differ from their mirror by up to {asymmetry:.3g}, the largest is {largest:.3g})"
    return None


@dataclass
class GramFolder:
    """A Grams folder: its manifest, and each weight's Gram."""

    path: str
    manifest: dict

    def module_of(self, weight_name: str) -> dict | None:
        """The manifest entry of the module owning a `<module>.weight` tensor, or None."""
        if not weight_name.endswith(".weight"):
            return None
        return self.manifest["modules"].get(weight_name.removesuffix(".weight"))


def gram_folder(path: str) -> GramFolder:
    """load_gram_folder, once per path and process (plans and merges look up every tensor's Gram), and again
    once the folder's files are rewritten."""
    return _gram_folder(path, folder_identity(path))


@functools.cache
def _gram_folder(path: str, identity: tuple) -> GramFolder:
    return load_gram_folder(path)


_MANIFEST_TYPES = {"format": str, "version": int, "model": str, "examples": int, "tokens": int, "dtype": str,
                   "packed": bool, "max_length": (int, type(None)), "modules": dict}


def load_gram_folder(path: str) -> GramFolder:
    """The validated manifest of a Grams folder; CheckpointError naming the file otherwise."""
    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: not a Grams folder ({MANIFEST_FILE} is missing; write one with "
                              "`merge-engine stats`)")
    manifest = read_json(inside_folder(path, MANIFEST_FILE, path))
    problem = _manifest_problem(manifest, Checkpoint(path).tensors)
    if problem:
        raise CheckpointError(f"{file}: {problem}")
    return GramFolder(path, manifest)


def _manifest_problem(manifest, stored: dict) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f'not a Grams manifest (expected "format": "{MANIFEST_FORMAT}")'
    if manifest.get("version") != MANIFEST_VERSION:
        return f"unsupported version {manifest.get('version')!r} (this merge_engine reads {MANIFEST_VERSION})"
    for key, types in _MANIFEST_TYPES.items():
        if not isinstance(manifest.get(key), types) or (isinstance(manifest.get(key), bool) and types is not bool):
            return f'field "{key}" is missing or has the wrong type'
    if manifest["dtype"] not in STATS_DTYPES or manifest["tokens"] < 1:
        return f'"dtype" must be one of {list(STATS_DTYPES)} and "tokens" >= 1'
    for module, entry in manifest["modules"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("gram"), str) and isinstance(entry.get("in_features"), int)
                and entry["in_features"] > 0 and isinstance(entry.get("transposed"), bool)
                and isinstance(entry.get("rows"), int) and entry["rows"] > 0):
            return (f'module "{module}": expected {{"gram": name, "in_features": int > 0, "transposed": bool, '
                    '"rows": int > 0}')
        want = stored_shape(entry["in_features"], manifest["packed"])
        info = stored.get(entry["gram"])
        if info is None or tuple(info.shape) != want:
            return (f'module "{module}": Gram tensor "{entry["gram"]}" is '
                    f"{'missing' if info is None else list(info.shape)}, expected {list(want)}")
    return None
