"""Merges of raw weight files: mergekit-pytorch's configs (`merge-engine pytorch CONFIG OUT`).

Each model is one weight file (a .safetensors file, or a torch.save file read without running its pickle), with
no config.json and no layer structure: every tensor name is merged by the config's method, its parameters resolved
for that name at layer position 0 (t = 0: a gradient gives its first value), as mergekit-pytorch resolves them.
A tensor some models lack is refused (every such tensor named), skipped with `tensor_intersection`, or merged from
the models that hold it with `tensor_union`. The config is mergekit's without slices: merge_method, models (each
`model: FILE` and its parameters), base_model, parameters, dtype, out_dtype.

The plan is the engine's (plan.py: every tensor's inputs, shapes, dtypes and parameters checked before any data is
read) and so is the rest (engine.py: streamed reads, the kernels, a temporary output folder moved into place).
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from typing import Any

from merge_engine.config import MergeConfig, Slice, parse_config, read_yaml_and_text
from merge_engine.engine import (
    MergeOptions,
    MergeReport,
    _Pipeline,
    check_inputs_unchanged,
    check_options,
    given_options,
    load_kernels,
)
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError
from merge_engine.io.checkpoint import Checkpoint, read_weight_header
from merge_engine.io.writer import ShardedWriter, check_output_apart
from merge_engine.plan import MergePlan, _plan_tensor, check_side_folders, open_side_folders, warn_unmatched_filters
from merge_engine.progress import progress_bar

_KEYS = {"merge_method", "models", "parameters", "dtype", "base_model", "out_dtype"}
log = logging.getLogger("merge_engine")
MISSING = ("refuse", "intersection", "union")  # what a tensor some models lack gets


class WeightFile(Checkpoint):
    """One weight file as a checkpoint (mergekit-pytorch's inputs): its tensors, no config.json."""

    def _check_folder(self) -> None:
        try:
            mode = os.stat(self.path).st_mode
        except OSError as e:  # ELOOP: links that lead back to themselves, which os.path.exists calls missing
            why = {errno.ENOENT: "does not exist", errno.ELOOP: "is a symbolic link loop"}.get(
                e.errno, f"cannot be read ({e.strerror})")
            raise CheckpointError(f"{self.path}: weight file {why}") from None
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end: never opened
            got = "a folder" if stat.S_ISDIR(mode) else "a FIFO, socket or device (not a regular file)"
            raise CheckpointError(f"{self.path}: expected a weight file (.safetensors, or a torch.save file), "
                                  f"got {got}")

    def _read_headers(self) -> dict:
        infos, self._identities[self.path] = read_weight_header(self.path)
        return infos

    @property
    def config(self) -> dict:
        return {}


def load_flat_config(path: str, strict: bool = False) -> MergeConfig:
    content, text = read_yaml_and_text(path, strict)
    config = parse_flat_config(content, source=path, strict=strict)
    config.text = text
    return config


def parse_flat_config(raw: Any, source: str | None = None, strict: bool = False) -> MergeConfig:
    """A mergekit-pytorch config as a merge config of one slice (the base appended when models does not list it,
    as mergekit does); keys a mergekit-yaml config has but mergekit-pytorch's has not (slices, tokenizer...) are
    refused rather than ignored: they would mean nothing here."""
    if not isinstance(raw, dict):
        raise ConfigError(["the config must be a mapping (merge_method, models, ...)"], source)
    problems = [f"{key}: not a key of mergekit-pytorch's configs (merge_method, models, base_model, parameters, "
                "dtype, out_dtype)" for key in sorted(map(str, set(raw) - _KEYS))]
    if not isinstance(raw.get("models"), list) or not raw["models"]:
        problems.append("models: expected a list of {model: FILE, parameters: ...} entries")
    if problems:
        raise ConfigError(problems, source, raw)
    return parse_config(raw, source=source, strict=strict)


def plan_flat_merge(cfg: MergeConfig, missing: str = "refuse") -> MergePlan:
    """Every tensor name of the models (the base's only where the models hold it too, as mergekit), merged by the
    method at t = 0; a tensor some inputs lack as `missing` says. Every problem in one ConfigError."""
    if missing not in MISSING:
        raise MergeEngineError(f"missing must be one of {', '.join(MISSING)}, not {missing!r}")
    models, side = _open(cfg)
    plan = MergePlan(cfg, models, side)
    whole = cfg.slices[0]
    listed = whole.sources[:len(cfg.raw["models"])]  # (parse_config appends the base after them when unlisted)
    names = list(dict.fromkeys(n for src in listed for n in models[src.model].tensors))
    problems: list[str] = []
    subsets: dict[tuple[str, ...], Slice] = {}
    for name in names:
        holders = tuple(src.model for src in whole.sources if name in models[src.model].tensors)
        if len(holders) < len(whole.sources):
            if missing == "intersection":
                continue
            if missing == "refuse":
                lacking = [models[s.model].path for s in whole.sources if s.model not in holders]
                problems.append(f"tensor '{name}' is missing from {', '.join(lacking)} (--tensor-intersection "
                                "skips such tensors, --tensor-union merges them from the models that hold them)")
                continue
        s = subsets.get(holders) or subsets.setdefault(holders, _subset(cfg, holders, name, problems))
        _plan_tensor(plan, s, name, [name] * len(holders), 0.0, problems)
    warn_unmatched_filters(cfg, plan.jobs)
    check_side_folders(plan, problems)
    if not plan.jobs and not problems:  # the wrong files (mergekit-pytorch writes an empty folder, unsaid)
        why = "no tensor name is in every file (-i skips the others)" if names else "the files hold no tensors"
        log.warning("%s: %s, so the output holds none", ", ".join(models[src.model].path for src in listed), why)
    if problems:
        raise ConfigError(problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else []),
                          "inputs")
    return plan


def _open(cfg: MergeConfig) -> tuple[dict[str, Checkpoint], dict[str, Checkpoint]]:
    """The weight files and the side-input folders (a fisher method's `fisher: FOLDER`...), every unreadable one
    in one ConfigError."""
    models, problems = {}, []
    for ref in cfg.referenced_models():
        try:
            models[ref] = WeightFile(ref)
        except CheckpointError as e:
            problems.append(str(e))
    side = open_side_folders(cfg, problems)
    if problems:
        raise ConfigError(problems, "inputs")
    return models, side


def _subset(cfg: MergeConfig, holders: tuple[str, ...], first: str, problems: list[str]) -> Slice:
    """The slice of the models holding some tensors, `first` the first of them (added to cfg.slices, where the
    planner finds it); the method's input problems for it (a base it needs but lacks, too few inputs) appended."""
    whole = cfg.slices[0]
    if len(holders) == len(whole.sources):
        return whole
    s = dataclasses.replace(whole, sources=[src for src in whole.sources if src.model in holders])
    cfg.slices.append(s)
    base = cfg.base_model if cfg.base_model in holders else None
    held = f"{', '.join(holders)} hold ('{first}' first)"
    if cfg.method.base == "required" and base is None:
        problems.append(f"the base model {cfg.base_model} lacks tensors that {held}, and {cfg.method.name} needs "
                        "the base's (--tensor-intersection skips them)")
    else:
        problems += [f"{p} (--tensor-intersection skips them)"
                     for p in cfg.method.input_problems(list(holders), base, f"tensors only {held}")]
    return s


def flat_merge(config: MergeConfig | dict | str | os.PathLike, out_dir: str | os.PathLike,
               options: MergeOptions | None = None, missing: str = "refuse") -> MergeReport:
    """Merge the weight files a mergekit-pytorch config names into out_dir (model.safetensors, sharded with an
    index past out_shard_size)."""
    started = time.perf_counter()
    options = given_options(options)
    out_dir = os.fspath(out_dir)
    cfg = config if isinstance(config, MergeConfig) else (
        parse_flat_config(config) if isinstance(config, dict) else load_flat_config(os.fspath(config)))
    device = check_options(out_dir, options)
    plan = plan_flat_merge(cfg, missing)
    check_output_apart(out_dir, [ckpt.path for ckpt in (*plan.models.values(), *plan.side.values())])
    writer = ShardedWriter(out_dir, plan.entries(), options.out_shard_size, options.overwrite,
                           direct=options.direct_io != "off")
    try:
        with writer.completing():
            with progress_bar(total=sum(j.bytes_in for j in plan.jobs), unit="B", unit_scale=True, desc="merging",
                              disable=options.quiet) as bar:
                load_kernels(device)
                bytes_read = _Pipeline(plan, plan.jobs, writer, device, options).run(bar.update)
            check_inputs_unchanged(plan)
    finally:
        for ckpt in plan.models.values():
            ckpt.close()
    return MergeReport(len(plan.jobs), bytes_read, writer.bytes_written, time.perf_counter() - started,
                       writer.out_dir)
