"""The Fisher folder format (written by `merge-engine fisher`, merge_engine/stats/fisher.py; read by the
Fisher merge methods, merge_engine/methods/fisher.py): safetensors shard(s) of the diagonal Fisher under
the model's tensor names, and `fisher.json`:
    {"format": "merge_engine.fisher", "version": 1, "model": ..., "variant": "empirical" | "sampled",
     "granularity": "per_example" | "per_batch", "examples": N, "tokens": T (next-token positions),
     "dtype": storage dtype, "seed": int, "max_length": L, "sum_squares": float, "tensors": count}
`sum_squares` is the float64 sum over all tensors of sum(F^2), so a merge can L2-normalise a Fisher
without reading it. A folder without fisher.json (a Fisher from elsewhere) is read as tensors only.
"""
from __future__ import annotations

import functools
import os

from merge_engine.dtypes import dtype_name
from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.safetensors_format import folder_identity
from merge_engine.io.untrusted import inside_folder, is_finite_number, read_json
from merge_engine.ops.fisher import FISHER_DTYPES

VARIANTS = ("empirical", "sampled")
GRANULARITIES = ("per_example", "per_batch")
MANIFEST_FILE = "fisher.json"
MANIFEST_FORMAT = "merge_engine.fisher"
MANIFEST_VERSION = 1


def has_manifest(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST_FILE))


def check_fisher_folder(fisher: Checkpoint) -> None:
    """A Fisher folder as a merge reads it: its fisher.json when it has one (a Fisher from elsewhere may not), and
    tensors of floating point (an integer Fisher would be merged as importances truncated to whole numbers)."""
    if has_manifest(fisher.path):
        fisher_manifest(fisher.path)
    info = next((i for i in fisher.tensors.values() if not i.dtype.is_floating_point), None)
    if info is not None:
        raise CheckpointError(f"{info.file}: Fisher tensor '{info.name}' is {dtype_name(info.dtype)}, not floating "
                              "point")


def fisher_manifest(path: str) -> dict:
    """load_fisher_manifest, once per path and process (a merge reads it per tensor), and again once the
    folder's files are rewritten."""
    return _fisher_manifest(path, folder_identity(path))


@functools.cache
def _fisher_manifest(path: str, identity: tuple) -> dict:
    return load_fisher_manifest(path)


_MANIFEST_TYPES = {"format": str, "version": int, "model": str, "variant": str, "granularity": str,
                   "examples": int, "tokens": int, "dtype": str, "seed": int, "max_length": (int, type(None)),
                   "sum_squares": (float, int), "tensors": int}


def load_fisher_manifest(path: str) -> dict:
    """The validated fisher.json of a Fisher folder; CheckpointError naming the file otherwise."""
    file = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: not a Fisher folder ({MANIFEST_FILE} is missing)")
    manifest = read_json(inside_folder(path, MANIFEST_FILE, path))
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{file}: {problem}")
    stored = len(Checkpoint(path).tensors)
    if stored != manifest["tensors"]:
        raise CheckpointError(f"{file}: lists {manifest['tensors']} tensors but the folder holds {stored}")
    return manifest


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f'not a Fisher manifest (expected "format": "{MANIFEST_FORMAT}")'
    if manifest.get("version") != MANIFEST_VERSION:
        return f"unsupported version {manifest.get('version')!r} (this merge_engine reads {MANIFEST_VERSION})"
    for key, types in _MANIFEST_TYPES.items():
        if key not in manifest:
            return f'field "{key}" is missing'
        if not isinstance(manifest[key], types) or isinstance(manifest[key], bool):
            return f'field "{key}" has the wrong type ({type(manifest[key]).__name__})'
    choices = {"variant": VARIANTS, "granularity": GRANULARITIES, "dtype": tuple(map(dtype_name, FISHER_DTYPES))}
    for key, allowed in choices.items():
        if manifest[key] not in allowed:
            return f'field "{key}" is {manifest[key]!r}, expected one of {list(allowed)}'
    if manifest["examples"] < 1 or not (is_finite_number(manifest["sum_squares"]) and manifest["sum_squares"] >= 0):
        return '"examples" must be >= 1 and "sum_squares" finite and >= 0'
    return None
