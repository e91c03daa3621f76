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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeEngineError(f"device '{name}': CUDA is not available on this machine")
    return device
