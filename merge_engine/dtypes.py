"""Names of torch dtypes, as configs, command lines and manifests spell them (safetensors' own codes,
F32, BF16..., belong to its file format: merge_engine/io/safetensors_format.py)."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                                  "float64": torch.float64}
# what the statistics commands run a model in and store their results as
STATS_DTYPES = ("float32", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def dtype_named(name: str | None) -> torch.dtype | None:
    """'bfloat16' -> torch.bfloat16; None stays None (as stored)."""
    return None if name is None else DTYPES[name]
