"""Patches applied to and removed from a model held in memory (a torch module or a dict of tensors), for tools
that keep a model loaded: the same arithmetic and checks as the file paths (apply.py), written into the tensors'
own storage, so a live model (on any device) changes without a reload."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.safetensors_format import TensorInfo
from merge_engine.patches.apply import PatchArg, PatchSet

MEMORY = "<model in memory>"


class MemoryTable:
    """The tensor table of tensors in memory, as Checkpoint has for a folder (what patches are checked against)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.path = MEMORY
        self.tensors = {name: TensorInfo(name, MEMORY, t.dtype, tuple(t.shape), i, t.numel() * t.element_size())
                        for i, (name, t) in enumerate(tensors.items())}


def apply_patches_in_memory(model: torch.nn.Module | Mapping[str, torch.Tensor], patches: Sequence[PatchArg],
                            check_base: bool = True) -> int:
    """Add the patches (folders, or (folder, scale) pairs) to the model's tensors in place; returns how many
    tensors changed. Names are the model's state_dict names, as in its checkpoint."""
    return _update(model, patches, 1, check_base)


def remove_patches_in_memory(model: torch.nn.Module | Mapping[str, torch.Tensor], patches: Sequence[PatchArg],
                             check_base: bool = True) -> int:
    """Subtract the patches (each times its scale) from the model's tensors in place."""
    return _update(model, patches, -1, check_base)


@torch.no_grad()
def _update(model, patches: Sequence[PatchArg], sign: int, check: bool) -> int:
    tensors = model.state_dict(keep_vars=True) if isinstance(model, torch.nn.Module) else model
    patch_set = PatchSet(MemoryTable(tensors), patches, sign, check)
    try:
        # every tensor computed before any is written, so a refusal (a base check) leaves the model as it was
        updated = {name: patch_set.values(name, tensors[name].detach()) for name in patch_set.changed}
        check_tied_alike(tensors, updated)
        for name, values in updated.items():
            tensors[name].data.copy_(values)
    finally:
        patch_set.close()
    return len(updated)


def check_tied_alike(tensors: Mapping[str, torch.Tensor], updated: Mapping[str, torch.Tensor]) -> None:
    """Tensors of one storage (tied weights: a model's lm_head and its embeddings) hold one value: patches that
    change them differently (made from a model whose copies were untied) are refused, as writing both would keep
    the last one's change only."""
    first: dict[int, str] = {}
    for name, values in updated.items():
        tied = first.setdefault(tensors[name].data_ptr(), name)
        if tied != name and not torch.equal(updated[tied], values):
            raise CheckpointError(f"'{tied}' and '{name}' are tied in the model (one storage), but the patches change "
                                  "them differently (they were made from a model with the two untied): apply them to "
                                  "a model with its own copy of each")
