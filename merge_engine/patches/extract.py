"""Extracting a patch: the difference TUNED - BASE, tensor by tensor, streamed into a patch folder.

plan (names, layers) -> read base and tuned tensors in file order -> difference -> stored form (float with
fixups, int8/int4 per row, or low rank: lowrank.py) -> appended to the patch shards -> patch_config.json ->
the folder is renamed into place. Tensors the fine-tune left unchanged are not stored.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.writer import ShardedWriter, check_output_apart
from merge_engine.patches import arithmetic as ar
from merge_engine.patches.files import AppendedShards, header_room
from merge_engine.patches.format import PATCH_CONFIG, SHARD_STEM, PatchedTensor, config_text
from merge_engine.patches.select import (
    OUTSIDE_LAYERS,
    Selection,
    candidates,
    chosen_layers,
    in_order,
    layer_norms,
    layer_of,
    select,
)

STORAGE_CHOICES = ("auto", *ar.STORAGES, "lora")
log = logging.getLogger("merge_engine.patches")


@dataclass(frozen=True)
class StoredRow:
    """One stored tensor: its bytes in the patch against in the checkpoint, and what storing it lost."""

    name: str
    patch_bytes: int
    full_bytes: int
    relative_error: float  # ||stored - d|| / ||d||, before fixups
    fixups: int = 0
    rank: int | None = None


@dataclass
class ExtractReport:
    base: str
    tuned: str
    out: str
    storage: str
    rows: list[StoredRow] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (name, why) for tensors not stored
    checkpoint_bytes: int = 0  # every tensor of TUNED
    norms: dict | None = None  # per layer, when layers were chosen by norm
    seconds: float = 0.0

    @property
    def patch_bytes(self) -> int:
        return sum(r.patch_bytes for r in self.rows)

    def summary(self) -> str:
        share = self.patch_bytes / max(self.checkpoint_bytes, 1)
        fixups = sum(r.fixups for r in self.rows)
        worst = max((r.relative_error for r in self.rows), default=0.0)
        return (f"{self.out}: {self.storage} patch of {len(self.rows)} tensors, {self.patch_bytes / 1e6:,.1f} MB "
                f"({100 * share:.1f}% of the full checkpoint's {self.checkpoint_bytes / 1e6:,.1f} MB); "
                f"worst relative error {worst:.3g}" + (f", {fixups:,} fixups" if fixups else "")
                + f"; {len(self.unchanged)} tensors unchanged, {len(self.left_out)} left out; {self.seconds:.2f} s")

    def table(self) -> str:
        lines = [f"{'tensor':<48} {'patch MB':>9} {'full MB':>9} {'rel. error':>11} {'fixups':>8}"
                 + ("  rank" if self.storage == "lora" else "")]
        for r in self.rows:
            lines.append(f"{r.name[-48:]:<48} {r.patch_bytes / 1e6:9.3f} {r.full_bytes / 1e6:9.3f} "
                         f"{r.relative_error:11.3g} {r.fixups:8d}" + (f"  {r.rank}" if r.rank is not None else ""))
        lines += [f"{name[-48:]:<48} left out: {why}" for name, why in self.left_out]
        return "\n".join(lines)


def extract_patch(base: str, tuned: str, out_dir: str, storage: str = "auto", selection: Selection = Selection(),
                  rank: int | None = None, energy: float | None = None, overwrite: bool = False,
                  shard_size: int = 5 * 10**9) -> ExtractReport:
    """Write the patch TUNED - BASE of the selected tensors to out_dir (storage: auto, the weights' own float dtype;
    a float dtype name; int8; int4; or lora, with a rank and/or an energy share per module)."""
    if storage not in STORAGE_CHOICES:
        raise ValueError(f"storage must be one of {', '.join(STORAGE_CHOICES)}, got {storage!r}")
    if storage != "lora" and (rank is not None or energy is not None):
        raise ValueError("rank and energy choose a low-rank patch's size; they need storage='lora'")
    start = time.perf_counter()
    check_output_apart(out_dir, [base, tuned])
    b, t = Checkpoint(base), Checkpoint(tuned)
    try:
        names = candidates(b, t, selection)
        norms = layer_norms(b, t, names) if selection.top_norm is not None else None
        held = 1 + max((layer for layer in map(layer_of, names) if layer is not OUTSIDE_LAYERS), default=-1)
        layers = chosen_layers(selection, norms, held)
        kept = select(names, selection, layers)
        if not kept:  # not "equal to the base": nothing was compared
            raise CheckpointError(f"{t.path}: none of the {len(names)} tensor(s) the name filters match is in the "
                                  f"layers the layer selector keeps ({len(layers)} layer(s)), and tensors outside the "
                                  "layers need --outside-layers")
        storage = own_float_storage(t, kept) if storage == "auto" else storage
        report = ExtractReport(b.path, t.path, os.path.abspath(out_dir), storage, norms=norms,
                               checkpoint_bytes=sum(i.nbytes for i in t.tensors.values()))
        report.left_out = [(n, "not selected") for n in names if n not in set(kept)]
        storable = set(names)  # candidates: the floating-point tensors of at least one dimension
        unstorable = [n for n in t.tensors if n in b.tensors and selection.named(n) and n not in storable]
        report.left_out += [(n, UNSTORABLE) for n in unstorable_changes(b, t, select(unstorable, selection, layers))]
        writer = ShardedWriter(out_dir, [], layout=[], overwrite=overwrite)
        try:
            if storage == "lora":
                from merge_engine.patches.lowrank import write_low_rank
                stored = write_low_rank(b, t, kept, writer, report, rank, energy)
            else:
                stored = _write_dense(b, t, kept, storage, writer, report, shard_size)
            if not stored:
                raise CheckpointError(f"{t.path}: equals the base {b.path} in every selected tensor; no patch written")
            b.check_unchanged()
            t.check_unchanged()
            writer.add_file(PATCH_CONFIG, config_text(storage, b.path, stored))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    finally:
        b.close()
        t.close()
    report.seconds = time.perf_counter() - start
    stored_bytes = sum(r.full_bytes for r in report.rows)
    if storage in ar.FLOATS and any(r.fixups for r in report.rows) and report.patch_bytes > 1.25 * stored_bytes:
        wider = "int8 or int4" if storage == "float32" else "float32, int8 or int4"
        log.warning("%s: fixups make this %s patch %.0f%% larger than the tensors it stores: the weights change by "
                    "more than %s carries (store it as %s)", report.out, storage,
                    100 * (report.patch_bytes / stored_bytes - 1), storage, wider)
    return report


UNSTORABLE = "changed, but a patch stores only floating-point tensors of at least one dimension"


def unstorable_changes(b: Checkpoint, t: Checkpoint, names: list[str]) -> list[str]:
    """Of the selected tensors a patch cannot hold (scalars, integer or bool buffers), those the fine-tune changed:
    named in a warning, as applying the patch leaves them as the base has them."""
    changed = [n for n in names if (b.tensors[n].dtype, b.tensors[n].shape) != (t.tensors[n].dtype, t.tensors[n].shape)
               or not torch.equal(ar.bits(b.read(n)), ar.bits(t.read(n)))]
    if changed:
        log.warning("%s: %d changed tensor(s) are not floating-point tensors of at least one dimension, which a patch "
                    "cannot store (%s%s): applying the patch leaves them as the base %s has them", t.path,
                    len(changed), ", ".join(changed[:3]), ", ..." if len(changed) > 3 else "", b.path)
    return changed


def own_float_storage(ckpt: Checkpoint, names: list[str]) -> str:
    """The float storage that holds the selected weights' differences without fixups for small changes: their own
    dtype (float32 for fp32 or fp64 weights, and for a mix of bf16 and fp16)."""
    dtypes = {ckpt.tensors[n].dtype for n in names}
    if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}:
        return "bfloat16" if dtypes == {torch.bfloat16} else "float16"
    return "float32"


def _write_dense(b: Checkpoint, t: Checkpoint, names: list[str], storage: str, writer: ShardedWriter,
                 report: ExtractReport, shard_size: int) -> list[PatchedTensor]:
    shards = AppendedShards(writer.tmp_dir, SHARD_STEM, header_room(names, 5), shard_size)
    stored = []
    try:
        for name, form in in_order(lambda n: _stored_form(n, b.read(n), t.read(n), storage), names):
            if form is None:
                report.unchanged.append(name)
                continue
            parts, entry, error = form
            written_before = shards.bytes_written
            for part, tensor in parts.items():
                shards.add(f"{name}::{part}", tensor)
            stored.append(entry)
            report.rows.append(StoredRow(name, shards.bytes_written - written_before, b.tensors[name].nbytes, error,
                                         entry.fixups))
        shards.finish()
    except BaseException:
        shards.abort()
        raise
    return stored


def _stored_form(name: str, base: torch.Tensor, tuned: torch.Tensor, storage: str):
    """(the tensors to store by part, its PatchedTensor, the relative error), or None for an unchanged tensor.
    Runs on read-ahead threads."""
    if torch.equal(ar.bits(base), ar.bits(tuned)):  # bit for bit: a zero whose sign flipped is a change
        return None
    d = ar.difference(base, tuned)
    if not bool(torch.isfinite(d).all()):  # apply would refuse the patch as damaged
        raise CheckpointError(f"tensor '{name}': the fine-tune's difference from the base holds "
                              f"{int((~torch.isfinite(d)).sum())} NaN or Inf value(s) (from NaN or Inf in the base or "
                              "the fine-tune), which a patch cannot store")
    if storage in ar.FLOATS:
        kept = d.to(ar.FLOATS[storage])
        if not bool(torch.isfinite(kept).all()):  # apply would refuse the patch as damaged
            raise CheckpointError(f"tensor '{name}': the fine-tune's difference from the base reaches "
                                  f"{float(d.abs().max()):.4g}, past {storage}'s range; store this patch as "
                                  "bfloat16, float32, int8 or int4")
        fix = ar.fixups(base, tuned, kept)
        parts = {"delta": kept}
        if len(fix):
            parts |= {"fix_index": fix, "fix_base": base.reshape(-1)[fix.long()],
                      "fix_tuned": tuned.reshape(-1)[fix.long()]}
        error = _relative_error(kept.to(d.dtype), d)
    else:
        q, scale = ar.quantize_rows(d, storage)
        parts, fix = {"q": q, "scale": scale}, ()
        error = _relative_error(ar.dequantize_rows(q, scale, storage, d.shape).to(d.dtype), d)
    entry = PatchedTensor(name, tuple(base.shape), base.dtype, ar.fingerprint(base), ar.fingerprint(tuned), len(fix))
    return parts, entry, error


def _relative_error(stored: torch.Tensor, d: torch.Tensor) -> float:
    return float((stored - d).norm() / d.norm())
