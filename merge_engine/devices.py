"""Where the math runs: a --device argument (cpu, cuda, cuda:N or auto) as a torch.device."""
from __future__ import annotations

import torch

from merge_engine.errors import MergeEngineError


def resolve_device(name: str | torch.device) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergeEngineError(f"device '{name}': not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise MergeEngineError(f"device '{name}': merge_engine runs on cpu or cuda")
    if device.type == "cpu":  # torch takes cpu:N and ignores the N
        if device.index not in (None, 0):
            raise MergeEngineError(f"device '{name}': the CPU is one device, 'cpu' (threads: --num-threads)")
        return torch.device("cpu")  # (cpu:0 compares unequal to it)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeEngineError(f"device '{name}': CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # (else torch's invalid-ordinal error comes from the first stream or copy, the output already opened)
        count = torch.cuda.device_count()
        raise MergeEngineError(f"device '{name}': this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
