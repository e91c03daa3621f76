"""A patch as a merge input: `model: BASE+PATCH` in a config reads BASE's tensors with the patch applied at scale 1.

As with LoRA adapters (io/lora.py), nothing is rebuilt on disk: each base tensor the patch changes is corrected
right after it is read, with the same arithmetic (and base check) as `merge-engine patch apply`, so a merge of
BASE+PATCH equals the merge of the checkpoint that apply would write.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from merge_engine.io.checkpoint import Checkpoint
from merge_engine.patches.apply import patched_values
from merge_engine.patches.format import PATCH_CONFIG, DensePatch, read_patch_config


def is_patch(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, PATCH_CONFIG))


class PatchedCheckpoint(Checkpoint):
    """A base model folder whose tensors are read with a dense patch added."""

    def __init__(self, base: str, patch: str):
        super().__init__(base)
        self.reference = f"{base}+{patch}"
        self.patch = DensePatch(os.path.abspath(patch), self, read_patch_config(os.path.abspath(patch)))

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._apply(name, super().read(name, out))

    def read_pooled(self, name: str, take_bytes: Callable[[int], torch.Tensor], direct_io: str = "auto") -> torch.Tensor:
        return self._apply(name, super().read_pooled(name, take_bytes, direct_io))

    @property
    def folders(self) -> list[str]:
        return [self.path, self.patch.path]

    def _apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.patch.tensors:
            weight.copy_(patched_values(name, weight, [(self.patch, 1.0)], 1, check=True))
        return weight

    def check_unchanged(self) -> None:
        super().check_unchanged()
        self.patch.check_unchanged()

    def close(self) -> None:
        super().close()
        if hasattr(self, "patch"):
            self.patch.close()

    def __repr__(self) -> str:
        return f"PatchedCheckpoint({self.reference!r}, {len(self.patch.tensors)} tensors changed)"
