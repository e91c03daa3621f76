"""Where the math runs: a --device argument (cpu, cuda, cuda:N or auto) as a torch.device."""
from __future__ import annotations

import torch

from merge_engine.errors import MergeEngineError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeEngineError(f"--device {name}: CUDA is not available on this machine")
    return device
