"""Names of torch dtypes: as configs, command lines and manifests spell them, and as safetensors headers do."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                                  "float64": torch.float64}
# what the statistics commands run a model in and store their results as
STATS_DTYPES = ("float32", "bfloat16")
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def dtype_named(name: str | None) -> torch.dtype | None:
    """'bfloat16' -> torch.bfloat16; None stays None (as stored)."""
    return None if name is None else DTYPES[name]
