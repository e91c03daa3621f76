"""Applying and removing patches: into a new folder (streamed), in place (under the tiers' durable journal), or
in memory (memory.py). Every path computes each tensor with patched_values().

Several patches with their own scales go in one pass: each tensor is rounded once (arithmetic.py). Before a
patch changes a tensor, the tensor's fingerprint must match the patch's base (unless check_base=False: a
backbone updated since, or a model already patched); after one exact patch (float storage) is removed at scale 1,
the result must match the base's fingerprint, else nothing is written (streamed) or everything is rolled back
(in place). Output folders keep the input's files and layout: untouched tensors are copied byte for byte.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint, require_safetensors
from merge_engine.io.raw import tensor_bytes
from merge_engine.patches import arithmetic as ar
from merge_engine.patches.format import Patch, open_patch
from merge_engine.patches.select import in_order
from merge_engine.tiers.apply import check_streamed_output, in_file_order, stream_rewrite
from merge_engine.tiers.inplace import folder_lock, journaled_rewrite, roll_back_pending
from merge_engine.tiers.slices import OpenFiles, pwrite_all

PatchArg = str | tuple[str, float]  # a patch folder, or (folder, scale)
MAX_SCALE = float(torch.finfo(torch.float32).max)


@dataclass
class PatchRun:
    """What one apply or remove did."""

    model: str
    output: str
    patches: list[tuple[str, float]]
    tensors_changed: int
    seconds: float

    def summary(self) -> str:
        where = "in place" if self.output == self.model else f"-> {self.output}"
        used = ", ".join(f"{os.path.basename(p)} x{s:g}" for p, s in self.patches)
        return f"{self.model} {where}: {used}; {self.tensors_changed} tensors changed in {self.seconds:.2f} s"


class PatchSet:
    """Patches opened against one model, with their scales; sign -1 removes them."""

    def __init__(self, model: Checkpoint, patches: Sequence[PatchArg], sign: int, check: bool):
        if not patches:
            raise ValueError("no patch given")
        self.uses: list[tuple[Patch, float]] = []
        try:
            for arg in patches:
                path, scale = (arg, 1.0) if isinstance(arg, str) else arg
                if not abs(float(scale)) <= MAX_SCALE:
                    raise ValueError(f"{path}: scale {scale} must be a finite number of at most {MAX_SCALE:.3g} in "
                                     "magnitude (the differences are scaled in float32)")
                self.uses.append((open_patch(path, model), float(scale)))
        except BaseException:
            self.close()
            raise
        self.sign, self.check = sign, check
        self.changed = in_file_order(model, {n for p, _ in self.uses for n in p.tensors})

    def on(self, name: str) -> list[tuple[Patch, float]]:
        return [(p, s) for p, s in self.uses if name in p.tensors]

    def values(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return patched_values(name, weight, self.on(name), self.sign, self.check)

    def close(self) -> None:
        for p, _ in self.uses:
            p.close()


def patched_values(name: str, weight: torch.Tensor, uses: list[tuple[Patch, float]], sign: int,
                   check: bool) -> torch.Tensor:
    """Tensor `name` after adding (sign 1) or subtracting (-1) each patch's difference times its scale."""
    bases = [(patch, patch.tensors[name].base_fingerprint) for patch, _ in uses]
    if check and any(expected for _, expected in bases):
        held = ar.fingerprint(weight)  # one pass over the weight, whatever the number of patches
        for patch, expected in bases:
            if sign > 0 and expected and held != expected:
                raise CheckpointError(f"{patch.path}: tensor '{name}' differs from the base this patch was made for "
                                      "(another model, or one already patched: apply patches together in one "
                                      "command, or skip the check with --any-base)")
        still_base = [patch for patch, expected in bases if sign < 0 and expected and held == expected]
        if still_base:
            applied = ar.add_scaled(weight, [(patch.delta(name), scale) for patch, scale in uses])
            if torch.equal(ar.bits(applied), ar.bits(weight)):  # applied at these (small) scales, the patches left
                return weight                                  # this tensor as it was: removed, they leave it too
            raise CheckpointError(f"{still_base[0].path}: tensor '{name}' is the base this patch was made for: the "
                                  "patch is not in it (remove it from the model it was applied to, or pass --any-base)")
    out = ar.add_scaled(weight, [(patch.delta(name), sign * scale) for patch, scale in uses])
    _check_finite(name, weight, out, uses)
    exact = len(uses) == 1 and uses[0][1] == 1.0 and uses[0][0].storage in ar.FLOATS
    if exact:
        patch = uses[0][0]
        fix = patch.fixups(name)
        if fix is not None:
            index, base, tuned = (t.to(out.device) for t in fix)
            made_from, made = (base, tuned) if sign > 0 else (tuned, base)
            # the exact value only where the weight holds what the patch was made from there: on another
            # weight (--any-base) the stored difference added above stands, as everywhere else
            at = ar.bits(weight.reshape(-1)[index]) == ar.bits(made_from)
            out.view(-1)[index[at]] = made[at]
        tuned = patch.tensors[name].tuned_fingerprint
        if check and sign > 0 and tuned and ar.fingerprint(out) != tuned:  # the base matched: the data must give TUNED
            raise CheckpointError(f"{patch.path}: applying it to tensor '{name}' does not give the model it was made "
                                  "from (its stored difference is damaged)")
        expected = patch.tensors[name].base_fingerprint
        if check and sign < 0 and expected and ar.fingerprint(out) != expected:
            raise CheckpointError(f"{patch.path}: removing it from tensor '{name}' does not give back the base it was "
                                  "made for (was it applied at another scale, with other patches, or to another "
                                  "model?); pass --any-base to remove it anyway")
    return out


def _check_finite(name: str, weight: torch.Tensor, out: torch.Tensor, uses: list[tuple[Patch, float]]) -> None:
    """A patched weight holding NaN or Inf where the weight held none: the patches (a damaged or huge
    difference, lora_alpha, a scale past the dtype's range) are named, not written."""
    if not weight.is_floating_point() or bool(torch.isfinite(out).all()) or not bool(torch.isfinite(weight).all()):
        return
    bad = int((~torch.isfinite(out)).sum())
    raise CheckpointError(f"{', '.join(f'{p.path} (scale {s:g})' for p, s in uses)}: tensor '{name}' patched holds "
                          f"{bad} NaN or Inf value(s) (a difference or scale too large for {weight.dtype})")


def apply_patches(model_dir: str, patches: Sequence[PatchArg], out_dir: str, check_base: bool = True,
                  overwrite: bool = False, progress: bool = False) -> PatchRun:
    """Write the model with the patches added (each times its scale) to out_dir (progress: a progress bar)."""
    return _stream(model_dir, patches, out_dir, 1, check_base, overwrite, progress)


def remove_patches(model_dir: str, patches: Sequence[PatchArg], out_dir: str, check_base: bool = True,
                   overwrite: bool = False, progress: bool = False) -> PatchRun:
    """Write the model with the patches subtracted (each times its scale) to out_dir (progress: a progress bar)."""
    return _stream(model_dir, patches, out_dir, -1, check_base, overwrite, progress)


def apply_patches_in_place(model_dir: str, patches: Sequence[PatchArg], check_base: bool = True) -> PatchRun:
    """Add the patches to the model folder's own files (crash-safe: see merge_engine.tiers.inplace)."""
    return _in_place(model_dir, patches, 1, check_base)


def remove_patches_in_place(model_dir: str, patches: Sequence[PatchArg], check_base: bool = True) -> PatchRun:
    """Subtract the patches from the model folder's own files (crash-safe)."""
    return _in_place(model_dir, patches, -1, check_base)


def _stream(model_dir: str, patches: Sequence[PatchArg], out_dir: str, sign: int, check: bool,
            overwrite: bool, progress: bool) -> PatchRun:
    start = time.perf_counter()
    check_streamed_output(model_dir, out_dir, [p if isinstance(p, str) else p[0] for p in patches])
    ckpt = Checkpoint(model_dir)
    try:
        patch_set = PatchSet(ckpt, patches, sign, check)
        try:
            def patched(name: str) -> torch.Tensor:  # on read-ahead threads
                tensor = ckpt.read(name)
                return patch_set.values(name, tensor) if patch_set.on(name) else tensor

            def write_tensors(writer) -> None:
                for name, tensor in in_order(patched, in_file_order(ckpt)):
                    writer.write(name, tensor)

            out = stream_rewrite(ckpt, out_dir, overwrite, write_tensors, progress=(
                ("applying patches" if sign > 0 else "removing patches") if progress else None))
        finally:
            patch_set.close()
    finally:
        ckpt.close()
    return _run(ckpt.path, out, patch_set, start)


def _in_place(model_dir: str, patches: Sequence[PatchArg], sign: int, check: bool) -> PatchRun:
    start = time.perf_counter()
    with folder_lock(model_dir):
        roll_back_pending(model_dir)
        ckpt = Checkpoint(model_dir)
        try:
            require_safetensors(ckpt, "patching in place")
            patch_set = PatchSet(ckpt, patches, sign, check)
            try:
                _rewrite(ckpt, patch_set)
            finally:
                patch_set.close()
        finally:
            ckpt.close()
    return _run(ckpt.path, ckpt.path, patch_set, start)


def _rewrite(ckpt: Checkpoint, patch_set: PatchSet) -> None:
    """Journal every tensor the patches change (whole), then rewrite each; any failure rolls everything back."""
    def rewrite(files: OpenFiles, journal, name: str) -> None:
        values = patch_set.values(name, ckpt.read(name)).contiguous()
        pwrite_all(files.fd(ckpt.tensors[name].file), tensor_bytes(values), ckpt.tensors[name].data_start)

    journaled_rewrite(ckpt, {n: (0, [(0, ckpt.tensors[n].shape[0])]) for n in patch_set.changed}, rewrite)


def _run(model: str, output: str, patch_set: PatchSet, start: float) -> PatchRun:
    used = [(p.path, s) for p, s in patch_set.uses]
    return PatchRun(model, output, used, len(patch_set.changed), time.perf_counter() - start)
