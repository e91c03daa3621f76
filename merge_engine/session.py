"""In-memory merge sessions: every input read once, a live transformers model whose parameters are the
merge's output, and merges again that recompute only what a change of parameters touches.

    session = MergeSession("merge.yml", device="cuda")
      build_plan                          the engine's per-tensor jobs (models, headers, parameters checked)
      plan_memory                         inputs + live model + work space against free memory: refused
                                          before any read when it cannot fit, with what would
      live_model                          the output's transformers model, its parameters left unset
      read every input tensor once        onto the device when they fit, else into pinned host memory; a
                                          tensor several models share as their folder stores it (a base
                                          and the LoRA experts over it) is held once
      merge(config)                       every tensor, into the live model
    session.merge(other_config)           the same models, other parameters: each tensor's parameters are
                                          resolved again and only the tensors whose parameters changed are
                                          merged, by engine.compute, straight into the model's storage
    session.model                         the live model (evaluate it in place)
    session.save(out_dir)                 the files `merge-engine CONFIG OUT` writes for the current config

A tensor is merged by engine.compute, the function the engine's pipeline calls, with the same inputs on the
same device, so the live model equals the engine's output bit for bit (tests/test_session.py).

LoRA inputs (`BASE+ADAPTER`) are held one of two ways, which the memory plan chooses (`lora`):
    applied    the update applied once, at the read, as the engine reads it: a dense copy per expert (fastest
               merges)
    factored   the base's tensor held once (shared with the base model and the other adapters over it) and the
               adapter's factors; each merge that needs the expert's tensor applies the update again, on the
               host, with the engine's read-time code (the same bits). An expert then costs its adapter's bytes,
               not a copy of the model: three 8B LoRA experts over their base hold 16 GB instead of 64 GB.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from merge_engine.config import MergeConfig
from merge_engine.devices import resolve_device
from merge_engine.engine import (
    MergeOptions,
    as_int,
    as_merge_config,
    check_inputs_unchanged,
    check_options,
    check_output_outside_inputs,
    check_seed_and_lora_dtype,
    compute,
    given_options,
    load_kernels,
    output_model_config,
    write_side_files,
    written_dtype,
)
from merge_engine.errors import ConfigError, MergeEngineError
from merge_engine.extras import BUILDING_TRANSFORMERS_MODEL, require
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.experts import FusedExperts
from merge_engine.io.hub_cache import cache_folder, resolve_references
from merge_engine.io.lora import LoraCheckpoint, update_dtype
from merge_engine.io.writer import ShardedWriter, check_output_dir
from merge_engine.plan import MergePlan, TensorJob, build_plan, filter_names, resolve_parameters
from merge_engine.progress import progress_bar
from merge_engine.vocabulary import load_tokenizer, one_line

PLACEMENTS = ("auto", "device", "host")
LORA_MODES = ("auto", "applied", "factored")
GB = 1e9


class MemoryPlanError(MergeEngineError):
    """A session whose tensors cannot fit in the memory there is."""


@dataclass
class MemoryPlan:
    """Where a session's tensors live, and how many bytes each memory needs."""

    device: torch.device
    placement: str  # "device": the inputs are held on the device; "host": in (pinned) host memory, copied per tensor
    input_bytes: int  # every input tensor once (side inputs included), where the placement puts them
    model_bytes: int  # the live model
    work_bytes: int  # what merging the largest tensor allocates (session.work_bytes)
    lora: str = "applied"  # how LoRA inputs are held (the module's docstring)
    lora_bytes: int = 0  # host bytes beside the inputs for LoRA updates: scratch; factored, also the bases and
    # adapters beside inputs on the device
    evaluation_bytes: int = 0  # what evaluating the live model allocates beside it (evaluation.memory), where it
    # lives; not at once with work_bytes

    def needs(self) -> dict[str, int]:
        """Bytes needed per memory: 'host' and, on a GPU, the device's name."""
        # a trial merges, then evaluates: the two work spaces are not used at once (freed tensors go back to the
        # system, or, on a GPU, to PyTorch's cache, which it empties before it fails an allocation)
        work = max(self.work_bytes, self.evaluation_bytes)
        if self.device.type == "cpu":
            return {"host": self.input_bytes + self.lora_bytes + self.model_bytes + work}
        on_device = self.model_bytes + work + (self.input_bytes if self.placement == "device" else 0)
        return {str(self.device): on_device,
                "host": self.lora_bytes + (self.input_bytes if self.placement == "host" else 0)}

    def summary(self) -> str:
        where = "on the device" if self.placement == "device" or self.device.type == "cpu" else "in pinned host memory"
        factored = (f", LoRA updates applied at each merge ({self.lora_bytes / GB:.2f} GB more on the host)"
                    if self.lora == "factored" else f", LoRA scratch {self.lora_bytes / GB:.2f} GB" if self.lora_bytes else "")
        evaluation = f", evaluation {self.evaluation_bytes / GB:.2f} GB" if self.evaluation_bytes else ""
        return (f"inputs {self.input_bytes / GB:.2f} GB {where}{factored}, live model {self.model_bytes / GB:.2f} GB, "
                f"work {self.work_bytes / GB:.2f} GB{evaluation} "
                f"({', '.join(f'{k}: {v / GB:.2f} GB' for k, v in self.needs().items())})")

    def describe(self) -> str:
        return f"placement='{self.placement}'" + (", lora='factored'" if self.lora == "factored" else "")


@dataclass
class MergeStep:
    """What one session.merge did."""

    tensors: int  # tensors merged again
    bytes_read: int  # their inputs' bytes (what a merge from memory must at least read)
    seconds: float


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on a device; the host's available memory for 'cpu'."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def held_as(ckpt: Checkpoint, name: str, factored: bool, on_device: bool) -> list[tuple[tuple, int]]:
    """What one job input is held as: [(key, bytes)], a key naming the memory it is in ('device' or 'host').
    A tensor as its folder stores it (a plain model's, or one its LoRA adapter leaves as it is) is keyed by folder,
    name and the dtype it is read in (a LoRA merge dtype casts it), so that every model reading it so shares it; a
    LoRA expert's changed tensor is its own, applied (a dense copy) or, factored, the folder's tensor (held on the
    host, where updates are applied) plus the adapter's tensors for it."""
    where = "device" if on_device else "host"
    info = ckpt.tensors[name]
    if read_as_stored(ckpt, name):
        return [((where, "file", ckpt.path, name, info.dtype), info.nbytes)]
    if factored and is_factored(ckpt, name):
        return [(("host", "file", ckpt.path, name, info.dtype), info.nbytes),
                (("host", "adapter", id(ckpt), name), ckpt.adapter_bytes(name))]
    return [((where, "own", id(ckpt), name), info.nbytes)]


def read_as_stored(ckpt: Checkpoint, name: str) -> bool:
    """Whether ckpt reads tensor `name` as its folder stores it: a plain folder's, one its LoRA adapter leaves as it
    is, or a fused tensor (io/experts.py) of such experts."""
    if isinstance(ckpt, FusedExperts):
        return all(read_as_stored(ckpt.inner, source) for source in ckpt.sources[name])
    return type(ckpt) is Checkpoint or (isinstance(ckpt, LoraCheckpoint) and name not in ckpt.targets)


def is_factored(ckpt: Checkpoint, name: str) -> bool:
    """Whether a factored session applies this input's LoRA update at each merge (a low-rank update; a tensor the
    adapter only replaces is held applied)."""
    return isinstance(ckpt, LoraCheckpoint) and name in ckpt.targets and ckpt.targets[name].a is not None


def holdings(jobs: list[TensorJob], factored: bool = False, on_device: bool = False) -> dict[tuple, int]:
    """Every distinct tensor the jobs' inputs are held as (held_as) and its bytes."""
    return dict(kv for job in jobs for ckpt, name in job.inputs + job.side_reads()
                for kv in held_as(ckpt, name, factored, on_device))


def input_bytes(jobs: list[TensorJob]) -> int:
    """Bytes of the distinct input tensors of jobs (a tensor several jobs or models read counts once)."""
    return sum(holdings(jobs).values())


def lora_scratch_bytes(jobs: list[TensorJob], factored: bool) -> int:
    """Host scratch for LoRA updates: each adapter's fp32 (fp64) product and widened weight, grown to its largest
    update (LoraCheckpoint keeps them); factored, also the largest job's expert tensors the updates are applied in."""
    widest: dict[int, int] = {}

    def widen(adapted: Checkpoint, info) -> None:  # its scratch grows to its largest update
        widest[id(adapted)] = max(widest.get(id(adapted), 0), math.prod(info.shape) * update_dtype(info.dtype).itemsize)
    slots = 0
    for job in jobs:
        infos = []
        for ckpt, name in job.inputs:
            if is_factored(ckpt, name):
                infos.append(ckpt.tensors[name])
                widen(ckpt, ckpt.tensors[name])
            for source in ckpt.sources[name] if isinstance(ckpt, FusedExperts) else ():  # held applied, expert by expert
                if is_factored(ckpt.inner, source):
                    widen(ckpt.inner, ckpt.inner.tensors[source])
        slots = max(slots, sum(i.nbytes for i in infos))
    return 2 * sum(widest.values()) + (slots if factored else 0)


def plan_memory(plan: MergePlan, device: torch.device, placement: str = "auto",
                free: dict[str, int] | None = None, lora: str = "auto", evaluation: int = 0,
                shape: torch.nn.Module | None = None) -> MemoryPlan:
    """The first holding of a session's tensors that fits, in the order: inputs on the device, in host memory;
    LoRA inputs applied, factored (when `lora` is auto and the plan has LoRA inputs). MemoryPlanError saying what
    each needs and what would fit when none does. free: bytes free per memory ('host', the device's name);
    measured when None. evaluation: bytes kept free beside the live model for evaluating it (an evaluator's
    memory_bytes). shape: the live model on the meta device, when the caller has it (built when None)."""
    if placement not in PLACEMENTS:
        raise MemoryPlanError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    if lora not in LORA_MODES:
        raise MemoryPlanError(f"lora must be one of {', '.join(LORA_MODES)}, not {lora!r}")
    if placement == "host" and device.type == "cpu":
        raise MemoryPlanError("placement='host' holds the inputs in host memory beside a GPU's; on the CPU the "
                              "inputs are on the device already: use placement='device' or 'auto'")
    largest = max(map(work_bytes, plan.jobs), default=0)
    model = live_model_bytes(plan, shape if shape is not None else live_model(plan, torch.device("meta")))
    free = free if free is not None else {"host": free_memory(torch.device("cpu")),
                                          **({str(device): free_memory(device)} if device.type == "cuda" else {})}
    has_lora = any(is_factored(ckpt, name) for job in plan.jobs for ckpt, name in job.inputs)
    modes = ("applied", "factored") if has_lora else ("applied",)
    candidates = [_candidate(plan, device, p, m, model, largest, evaluation)
                  for m in modes for p in (("device",) if device.type == "cpu" else ("device", "host"))]
    def fits(p: MemoryPlan) -> bool:
        return all(need <= free.get(where, 0) for where, need in p.needs().items())
    wanted = [p for p in candidates if placement in ("auto", p.placement) and (lora in ("auto", p.lora) or not has_lora)]
    for p in wanted:
        if fits(p):
            return p
    lines = [f"{p.describe()} needs " + ", ".join(f"{v / GB:.3g} GB {k}" for k, v in p.needs().items()) for p in wanted]
    others = [p.describe() for p in candidates if p not in wanted and fits(p)]
    # a GPU too small for the live model: the whole session in host memory, where it may fit
    on_host = [p for p in (_candidate(plan, torch.device("cpu"), "device", m, model, largest, evaluation) for m in modes)
               if device.type == "cuda" and fits(p)]
    hint = (f"{others[0]} would fit" if others else
            "a smaller evaluation batch_size would fit" if any(fits(dataclasses.replace(p, evaluation_bytes=0))
                                                               for p in wanted) else
            "device='cpu'" + (", lora='factored'" if on_host[0].lora == "factored" else "") + " would fit (slower)"
            if on_host else "merge to disk with `merge-engine` instead (it streams), or use a device with more memory")
    evaluating = f", evaluation {evaluation / GB:.3g} GB" if evaluation else ""
    raise MemoryPlanError("the merge session does not fit in memory: " + "; ".join(lines) + " (inputs "
                          f"{input_bytes(plan.jobs) / GB:.3g} GB read once, live model {model / GB:.3g} GB, work "
                          f"{largest / GB:.3g} GB{evaluating}); free: "
                          + ", ".join(f"{k} {v / GB:.3g} GB" for k, v in free.items()) + f"; {hint}")


def live_model_bytes(plan: MergePlan, shape: torch.nn.Module) -> int:
    """The live model's bytes: every output tensor in the merge's dtype but those the model holds in float32
    (kept_in_fp32), tied ones once more (merge_targets gives them a tensor of their own), and those in another dtype
    than the model's both ways. shape: the live model on the meta device."""
    held = shape.state_dict(keep_vars=True)
    model_dtype = output_dtype(plan)
    upcast = kept_in_fp32(shape, model_dtype)
    loaded_as = loaded_names(shape, [name for name, _, _ in plan.entries()], held)
    return sum(math.prod(dims) * (4 if loaded_as[name] in upcast else dtype.itemsize
                                  + (model_dtype.itemsize if dtype != model_dtype else 0))  # (cast into the model)
               for name, dtype, dims in plan.entries())


def work_bytes(job: TensorJob) -> int:
    """What merging one job allocates beside the held inputs and the live model: its inputs as stored (copied to
    the device from host memory), their copies in the compute dtype where it differs (bf16 inputs merged in fp32),
    one more compute-dtype copy of them for the method's intermediates (task vectors, normalised copies), each
    input's rows in the output vocabulary's order where a tokenizer setting aligns them, and the result in the
    compute dtype and, where it differs, the output dtype."""
    out = math.prod(job.shape)
    if job.copy_only:
        return job.bytes_in + out * job.out_dtype.itemsize
    compute = job.compute_dtype.itemsize
    stored = [ckpt.tensors[name] for ckpt, name in job.inputs]
    widened = sum(info.numel for info in stored if info.dtype != job.compute_dtype) * compute
    intermediates = sum(info.numel for info in stored) * compute
    aligned = len(stored) * out * compute if job.rows is not None else 0  # each input's rows in the output's order
    result = out * (compute + (job.out_dtype.itemsize if job.out_dtype != job.compute_dtype else 0))
    return job.bytes_in + widened + intermediates + aligned + result


def _candidate(plan: MergePlan, device: torch.device, placement: str, lora: str, model: int, work: int,
               evaluation: int) -> MemoryPlan:
    on_device = device.type == "cuda" and placement == "device"
    held = holdings(plan.jobs, lora == "factored", on_device)
    placed = sum(v for k, v in held.items() if k[0] == ("device" if on_device else "host"))
    beside = sum(held.values()) - placed  # factored, on the host beside inputs on the device: bases and adapters
    return MemoryPlan(device, placement, placed, model, work, lora, beside + lora_scratch_bytes(plan.jobs, lora == "factored"),
                      evaluation)


class MergeSession:
    """A merge held in memory: see the module's docstring."""

    def __init__(self, config: MergeConfig | dict | str | os.PathLike, device: str = "auto", *, placement: str = "auto",
                 lora: str = "auto", random_seed: int = 0, allow_crimes: bool = False,
                 lora_merge_dtype: torch.dtype | None = None, progress: bool = True, plan: MergePlan | None = None,
                 evaluation_bytes: int = 0, hub_cache: str | os.PathLike | None = None):
        """placement, lora: see plan_memory (auto: the first that fits). random_seed, allow_crimes,
        lora_merge_dtype, hub_cache: as MergeOptions's. plan: build_plan(config, ...) when the caller has it already (its
        headers are not read again). evaluation_bytes: memory kept free beside the live model for evaluating it
        (an evaluator's memory_bytes(live_model(plan, torch.device("meta"))))."""
        random_seed, evaluation_bytes = as_int(random_seed), as_int(evaluation_bytes)
        check_seed_and_lora_dtype(random_seed, lora_merge_dtype)
        check_session_arguments(allow_crimes=allow_crimes, progress=progress, evaluation_bytes=evaluation_bytes)
        self._hub_cache = cache_folder(hub_cache)
        self.config = resolve_references(own_config(config), self._hub_cache)  # (as build_plan's: Hub ids made local)
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the GPU current now, not at each merge
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.random_seed = random_seed
        self.plan = plan or build_plan(self.config, allow_crimes, lora_merge_dtype=lora_merge_dtype,
                                       hub_cache=self._hub_cache)
        self.memory = plan_memory(self.plan, self.device, placement, lora=lora, evaluation=evaluation_bytes)
        load_kernels(self.device)
        self.model = live_model(self.plan, self.device)
        self._targets, self._cast = merge_targets(self.model, self.plan)
        self._scratch: dict[int, torch.Tensor] = {}  # factored inputs' tensors, per input slot (_inputs_of)
        self._inputs = self._read_inputs(progress)
        self._merged_with: list[Any] = [None] * len(self.plan.jobs)  # the parameters each tensor holds now
        self._job_index = {job.out_name: i for i, job in enumerate(self.plan.jobs)}
        self._lock = threading.RLock()  # one merge at a time: the scratch buffers and records are shared
        self.merge(self.config)

    # ---- reading ----

    def _read_inputs(self, progress: bool) -> list[list[torch.Tensor | FactoredInput]]:
        """Every job's inputs (then side inputs), each distinct tensor read once (held_as), where the memory plan
        puts it."""
        factored = self.memory.lora == "factored"
        on_device = self.device.type == "cuda" and self.memory.placement == "device"
        pin = self.device.type == "cuda" and self.memory.placement == "host"
        held: dict[tuple, torch.Tensor] = {}
        sums: dict[tuple, tuple[str, str, torch.Tensor]] = {}  # key -> (folder, tensor, its sum): NaN shows there
        out = []
        tensor_bytes = {k: v for k, v in holdings(self.plan.jobs, factored, on_device).items() if k[1] != "adapter"}
        with progress_bar(total=sum(tensor_bytes.values()), unit="B", unit_scale=True, desc="reading",
                          disable=not progress) as bar:
            for job in self.plan.jobs:
                tensors = []
                for ckpt, name in job.inputs + job.side_reads():
                    update_per_merge = factored and is_factored(ckpt, name)
                    key = held_as(ckpt, name, factored, on_device)[0][0]
                    if key not in held:
                        # the engine's reads: O_DIRECT for what the page cache lacks (cold: 5.9 s instead of 40 s
                        # for 8.8 GB of bf16 inputs on a 2-core VM)
                        if update_per_merge:  # the folder's tensor, on the host, where the update is applied
                            held[key] = _placed(ckpt.read_base_pooled(name, _fresh_bytes, "auto"), False, pin, self.device)
                        else:
                            held[key] = _placed(ckpt.read_pooled(name, _fresh_bytes, "auto"), on_device, pin, self.device)
                        if held[key].is_floating_point():
                            sums[key] = (ckpt.path, name, held[key].sum().float())
                        bar.update(tensor_bytes[key])
                    if update_per_merge:
                        ckpt.hold_adapter()
                        tensors.append(FactoredInput(ckpt, name, held[key]))
                    else:
                        tensors.append(held[key])
                out.append(tensors)
        check_inputs_unchanged(self.plan)  # what was read is all the session ever merges
        for ckpt in (*self.plan.models.values(), *self.plan.side.values()):
            ckpt.close()  # nothing is read again: the files may be deleted (their space freed) or their disk unmounted
        refuse_nan_inputs(held, sums)
        return out

    def job_inputs(self):
        """(job, its input tensors then side inputs, on the device) for every tensor of the plan (fresh tensors
        for factored LoRA inputs: the caller may keep them)."""
        for i, job in enumerate(self.plan.jobs):
            yield job, self._inputs_of(i, reuse=False)

    def _inputs_of(self, i: int, reuse: bool = True) -> list[torch.Tensor]:
        """Job i's inputs on the device: factored LoRA inputs applied (into this session's scratch when `reuse`),
        inputs held on the host copied over."""
        out = []
        for slot, t in enumerate(self._inputs[i]):
            if isinstance(t, FactoredInput):
                t = t.applied(self._slot(slot, t.base) if reuse else torch.empty_like(t.base))
            out.append(t.to(self.device, non_blocking=t.is_pinned()))
        return out

    def _slot(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        buffer = self._scratch.get(slot)
        if buffer is None or buffer.numel() < like.nbytes:
            buffer = self._scratch[slot] = torch.empty(like.nbytes, dtype=torch.uint8)
        return buffer[:like.nbytes].view(like.dtype).view(like.shape)

    # ---- merging ----

    def merge(self, config: MergeConfig | dict | str | os.PathLike | None = None) -> MergeStep:
        """Make the live model the merge of `config` (the session's models, other parameters; None: the
        current config), merging again only the tensors whose parameters changed. Calls from several threads
        run one at a time. A call that fails part way (or is interrupted) leaves the config as it was and each
        tensor recorded as what it holds: the next merge() merges again whatever differs."""
        cfg = None if config is None else resolve_references(self._same_models(own_config(config)), self._hub_cache)
        with self._lock:
            cfg = self.config if cfg is None else cfg  # the config when this call's turn comes
            key = method_key(cfg)
            todo = []
            for i, job in enumerate(self.plan.jobs):
                params = job_parameters(cfg, job)
                if self._merged_with[i] != (key, params):
                    todo.append((i, job if params is None else dataclasses.replace(job, shared=params[0],
                                                                                   per_model=params[1]),
                                 (key, params)))
            began = time.perf_counter()
            with torch.no_grad():
                for i, job, merged_with in todo:
                    self._merged_with[i] = None  # written in place: unknown until the write completes
                    self._merge_one(i, job, cfg)
                    self._merged_with[i] = merged_with
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.config = cfg
        return MergeStep(len(todo), input_bytes([job for _, job, _ in todo]), time.perf_counter() - began)

    def changed_outside(self, names) -> None:
        """Record that the caller wrote these tensors of the live model (by output name): the next merge()
        merges them again, and save() writes the merge of the session's config."""
        with self._lock:
            for name in names:
                self._merged_with[self._job_index[name]] = None

    def _merge_one(self, i: int, job: TensorJob, cfg: MergeConfig) -> None:
        target = self._targets[job.out_name]
        result = compute(job, self._inputs_of(i), cfg.method, self.random_seed,
                         into(target) if self.device.type == "cpu" else None)
        if result.data_ptr() != target.data_ptr():
            target.copy_(result)
        self.cast_into_model([job.out_name])

    def cast_into_model(self, names) -> None:
        """Copy these output tensors into the live model where it holds them in another dtype (merge_targets)."""
        for name in names:
            if name in self._cast:
                self._cast[name].copy_(self._targets[name])

    def _same_models(self, cfg: MergeConfig) -> MergeConfig:
        if without_parameters(cfg.raw) != without_parameters(self.config.raw):
            raise ConfigError(["a session merges configs that differ from its own only in parameters (models, "
                               "slices, method, dtypes and tokenizer as given when it was opened)"], "session.merge")
        return cfg

    # ---- output ----

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged tensors by output name (views of the live model's storage where it holds them), in the
        merge's dtype but for those transformers keeps in float32 (kept_in_fp32), which hold its values so."""
        return dict(self._targets)

    def tokenizer(self):
        return output_tokenizer(self.plan)

    def save(self, out_dir: str | os.PathLike, options: MergeOptions | None = None, extra_files: dict[str, str | bytes] | None = None) -> str:
        """Write the current merge as `merge-engine` would (same tensors, layout and side files, the current
        config as mergekit_config.yml), and extra_files (name -> content), through a temporary folder moved into
        place when complete. Tensors that do not hold the merge of the current config (a merge() that failed part
        way, tensors changed_outside) are merged again first, so that the files are that merge."""
        out_dir = os.fspath(out_dir)
        options = given_options(options, MergeOptions(quiet=True))
        check_options(out_dir, options)  # (as merge() checks them: before any work)
        with self._lock:
            self.merge()
            return self._save(out_dir, options, extra_files)

    def _save(self, out_dir: str, options: MergeOptions, extra_files: dict[str, str | bytes] | None) -> str:
        check_output_dir(out_dir, options.overwrite)
        check_output_outside_inputs(out_dir, self.plan)
        plan = dataclasses.replace(self.plan, config=self.config)
        writer = ShardedWriter(out_dir, plan.entries(), options.out_shard_size, options.overwrite,
                               direct=options.direct_io != "off")
        try:
            for name, dtype, _ in plan.entries():
                writer.write(name, self._targets[name].to(dtype))  # (tensors kept in float32: exact)
            write_side_files(plan, writer, options)
            for name, content in (extra_files or {}).items():
                writer.add_file(name, content)
            writer.flush()
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return writer.out_dir


@dataclass(frozen=True, eq=False)
class FactoredInput:
    """A LoRA expert's tensor held as its base's and the adapter's factors (the memory plan's lora='factored')."""

    ckpt: LoraCheckpoint
    name: str
    base: torch.Tensor  # the folder's tensor, on the host

    def applied(self, out: torch.Tensor) -> torch.Tensor:
        """The expert's tensor, in `out` (the base's shape and dtype): the engine's read-time update, the same bits."""
        return self.ckpt.apply_to(self.name, self.base, out)


def check_session_arguments(evaluation_bytes, **flags) -> None:
    """MergeSession's flags and its evaluation_bytes, refused by name before anything is read."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise MergeEngineError(f"MergeSession: {name} must be True or False, got {value!r}")
    number = isinstance(evaluation_bytes, (int, float)) and not isinstance(evaluation_bytes, bool)
    if not number or not 0 <= evaluation_bytes < math.inf:  # (an evaluator's estimate may be a float)
        raise MergeEngineError(f"MergeSession: evaluation_bytes must be a number of bytes (0 or more), "
                               f"got {evaluation_bytes!r}")


def job_parameters(cfg: MergeConfig, job: TensorJob, source: str = "session.merge") -> tuple[dict, list[dict]] | None:
    """A tensor's parameters under cfg (shared, per model), as the engine resolves them; None: copied, not merged."""
    if job.copy_only:
        return None
    try:
        names = filter_names(job.out_name, [n for _, n in job.inputs], job.outside_layers)
        return resolve_parameters(cfg, cfg.slices[job.slice_index], names, job.out_name, job.t, job.compute_dtype)
    except ValueError as e:
        raise ConfigError([f"{e} (tensor '{job.out_name}')"], source) from None


def refuse_nan_inputs(held: dict[tuple, torch.Tensor], sums: dict[tuple, tuple[str, str, torch.Tensor]]) -> None:
    """MergeEngineError naming every input tensor that holds NaN, as the engine refuses a merge that NaN reaches
    (checked once when the session opens: the inputs do not change between trials). One sum per tensor, read
    back together (one device sync); the tensors whose sum is not finite are then searched."""
    by_device: dict[torch.device, list[tuple]] = {}
    for key, (_, _, total) in sums.items():  # (factored LoRA bases stay on the host beside inputs on the device)
        by_device.setdefault(total.device, []).append(key)
    suspects = [key for keys in by_device.values()
                for key, ok in zip(keys, torch.isfinite(torch.stack([sums[k][2] for k in keys])).tolist()) if not ok]
    bad = [f"{sums[key][0]}: tensor '{sums[key][1]}' has {int(torch.isnan(held[key]).sum())} NaN value(s) "
           "(a corrupt checkpoint?)" for key in suspects if bool(torch.isnan(held[key]).any())]
    if bad:
        raise MergeEngineError("; ".join(bad))


def output_tokenizer(plan: MergePlan):
    """The merge's tokenizer: the one the config builds, else the donor model's."""
    if plan.vocabulary is not None and plan.vocabulary.tokenizer is not None:
        return plan.vocabulary.tokenizer
    transformers = require("transformers", "hf", "the tokenizer of a merge session")
    try:
        return load_tokenizer(transformers, plan.donor.path)
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
        raise ConfigError([f"{plan.donor.path}: cannot load its tokenizer ({one_line(e)})"], "tokenizer") from e


def own_config(config: MergeConfig | dict | str | os.PathLike) -> MergeConfig:
    """The config, parsed from a copy of a mapping: the caller edits its dict between merges, and an edit in place
    must not become the session's config unmerged (nor pass another model for the same one)."""
    return as_merge_config(copy.deepcopy(config) if isinstance(config, dict) else config)


def without_parameters(raw: Any) -> Any:
    """A raw config less its `parameters` mappings, where mergekit's schema has them (the top level, each module,
    each model, each slice and each slice's source): what a session's configs must share. Elsewhere (a token named
    "parameters" in tokenizer.tokens) the key is the config's own."""
    if not isinstance(raw, dict):
        return raw
    kept = _less_parameters(raw)
    if isinstance(kept.get("models"), list):
        kept["models"] = [_less_parameters(m) for m in kept["models"]]
    if isinstance(kept.get("slices"), list):
        kept["slices"] = [_slice_less_parameters(s) for s in kept["slices"]]
    if isinstance(kept.get("modules"), dict):
        kept["modules"] = {name: without_parameters(module) for name, module in kept["modules"].items()}
    return kept


def _slice_less_parameters(raw: Any) -> Any:
    kept = _less_parameters(raw)
    if isinstance(kept, dict) and isinstance(kept.get("sources"), list):
        kept["sources"] = [_less_parameters(source) for source in kept["sources"]]
    return kept


def _less_parameters(raw: Any) -> Any:
    return {k: v for k, v in raw.items() if k != "parameters"} if isinstance(raw, dict) else raw


def method_key(cfg: MergeConfig) -> tuple:
    """What, beside each tensor's parameters, decides the merge: the method and the global settings that
    specialise it (regmean's fallback, bmm's anchor), which are not per-tensor parameters."""
    own = {p.name for p in cfg.method.params}
    return cfg.method.name, tuple(sorted((k, repr(v)) for k, v in (cfg.parameters or {}).items() if k not in own))


def into(target: torch.Tensor):
    """take_output for engine.compute: the target's storage for the first request of its shape and dtype (the
    merge's result, written in place), fresh tensors for any other."""
    handed = False

    def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nonlocal handed
        if not handed and tuple(shape) == tuple(target.shape) and dtype == target.dtype and target.is_contiguous():
            handed = True
            return target
        return torch.empty(shape, dtype=dtype)
    return take


def _fresh_bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def _placed(t: torch.Tensor, to_device: bool, pin: bool, device: torch.device) -> torch.Tensor:
    if to_device:
        return t.to(device)
    return t.pin_memory() if pin else t


# ---- the live model ----

def output_config(plan: MergePlan):
    """The output's transformers config (the merge's config.json)."""
    transformers = require("transformers", "hf", "a merge session's live model")
    settings = output_model_config(plan)
    if not settings.get("model_type"):
        raise MergeEngineError(f"{plan.donor.path}: config.json has no model_type; a session needs it to build the "
                               "live model")
    # read back from the file the engine writes, as from_pretrained reads it (transformers 5 writes an infinite
    # float as {"__float__": "Infinity"}, which only its JSON reading decodes)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(settings, f)
        try:
            return transformers.AutoConfig.from_pretrained(folder)
        except Exception as e:  # transformers' errors vary by release and model (ValueError, strict dataclass errors)
            raise MergeEngineError(f"{plan.donor.path}: transformers {transformers.__version__} cannot build the "
                                   f"output's config from this config.json, which a session needs for its live model "
                                   f"({type(e).__name__}: {e}); `merge-engine CONFIG OUT` writes the merge "
                                   "without it") from None


def output_dtype(plan: MergePlan) -> torch.dtype:
    """The live model's dtype: the one config.json says, most of its tensors' (the merge's dtype)."""
    return written_dtype(plan) or torch.float32


def live_model(plan: MergePlan, device: torch.device) -> torch.nn.Module:
    """The output's transformers model (the donor's architecture and the merge's config.json) on the device,
    its weights allocated but not initialised: the session's merge fills them."""
    transformers = require("transformers", "hf", "a merge session's live model")
    config = output_config(plan)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls if isinstance(cls, type) else transformers.AutoModelForCausalLM
    with BUILDING_TRANSFORMERS_MODEL, _no_init_weights(transformers), torch.device(device):
        model = cls._from_config(config, dtype=output_dtype(plan)) if hasattr(cls, "_from_config") else cls.from_config(config)
    model.tie_weights()  # as from_pretrained does (the tied tensors share one storage)
    for tensor in kept_in_fp32(model, output_dtype(plan)).values():
        tensor.data = tensor.data.float()
    return model.eval().requires_grad_(False)


def kept_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors (by name) that from_pretrained loads in float32 in a model of this dtype, its dtype plan
    (_keep_in_fp32_modules: T5's wo in a float16 model; _keep_in_fp32_modules_strict, in bfloat16 too): the live
    model holds them so, to compute as the loaded output does. Matched as transformers 5 matches them."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    patterns = [re.compile(key.replace("*", ".*")) for key, kept in plan.items() if kept == torch.float32]
    return {name: t for name, t in model.state_dict(keep_vars=True).items()
            if t.is_floating_point() and any(p.search(name) for p in patterns)}


def _no_init_weights(transformers):
    """transformers' context that skips weight initialisation (moved between releases)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(__import__(module, fromlist=["no_init_weights"]), "no_init_weights")()
        except (ImportError, AttributeError):
            continue
    raise MergeEngineError(f"transformers {transformers.__version__} lacks no_init_weights")


def merge_targets(model: torch.nn.Module, plan: MergePlan) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(output tensor name -> where its merge goes, name -> the model's tensor its merge is cast into). The merge
    goes to the live model's parameter or buffer of that name. A name the model ties to an earlier one (lm_head to
    the embeddings) gets a tensor of its own, for save(): the model uses the first, as transformers does when it
    loads a tied model. A tensor the output stores in another dtype than the model's (an output of several dtypes)
    gets a tensor of its own too, and the model's holds it cast, as from_pretrained casts it."""
    held = model.state_dict(keep_vars=True)
    upcast = kept_in_fp32(model, output_dtype(plan))
    problems, targets, cast, storages = [], {}, {}, set()
    loaded_as = loaded_names(model, [name for name, _, _ in plan.entries()], held)
    sources = {job.out_name: job.inputs for job in plan.jobs}
    for name, dtype, shape in plan.entries():
        tensor = held.get(loaded_as[name])
        kept = torch.float32 if loaded_as[name] in upcast else dtype
        if tensor is None:
            problems.append(f"'{name}' is an output of the merge but not a tensor of {type(model).__name__}")
        elif tuple(tensor.shape) != tuple(shape) or (tensor.dtype != kept and not (tensor.is_floating_point()
                                                                                   and kept.is_floating_point)):
            problems.append(f"'{name}': the merge gives {dtype} {list(shape)}{_taken_from(sources.get(name))}, "
                            f"{type(model).__name__} has {tensor.dtype} {list(tensor.shape)}")
        elif tensor.data_ptr() in storages or tensor.dtype != kept:
            targets[name] = torch.empty(tuple(shape), dtype=kept, device=tensor.device)
            if tensor.data_ptr() not in storages:
                cast[name] = tensor.data
                storages.add(tensor.data_ptr())
        else:
            targets[name] = tensor.data
            storages.add(tensor.data_ptr())
    covered = {t.data_ptr() for t in [*targets.values(), *cast.values()]}
    problems += [f"'{name}' of {type(model).__name__} is not an output of the merge" for name, p in
                 model.named_parameters(remove_duplicate=False) if p.data_ptr() not in covered]
    if problems:
        raise MergeEngineError(f"the live model and the merge's outputs differ: {'; '.join(problems[:10])}"
                               + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else "")
                               + (_UNLOADABLE.format(donor=plan.donor.path) if any("the merge gives" in p
                                                                                   for p in problems) else "")
                               + (_MODULES_LEFT_OUT if plan.config.modules and any("not an output" in p
                                                                                   for p in problems) else ""))
    return targets, cast


# a merge whose tensors do not fit its own config.json: `merge-engine` writes it as mergekit does (a passthrough of
# slices from models whose vocabularies differ in size takes the embeddings from the first slice's model, the
# head from the last's), but from_pretrained refuses it (a size mismatch), and the live model is what it would load
_UNLOADABLE = ("; the live model is built from the output's config.json (from {donor}), which these tensors do not "
               "fit: transformers cannot load the output `merge-engine CONFIG OUT` writes for this config either (as "
               "when the inputs' vocabularies differ in size: take the embeddings and the output head from models of "
               "one vocabulary size, or give a tokenizer setting, e.g. `tokenizer: {{source: base}}`, which aligns "
               "them to one vocabulary)")
_MODULES_LEFT_OUT = (" (the config's modules: leaves out some of the model's modules, which the engine's output "
                     "lacks; a session holds the whole model: give every module)")



def _taken_from(inputs: list | None) -> str:
    models = list(dict.fromkeys(ckpt.path for ckpt, _ in inputs or []))
    return f" (from {', '.join(models)})" if models else ""


def loaded_names(model: torch.nn.Module, names: list[str], held: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checkpoint tensor name -> the model's name for it, as from_pretrained renames the checkpoint's tensors
    (transformers 5's conversion mapping: GPT-NeoX's embed_out is lm_head, Qwen2-VL's model.layers are
    model.language_model.layers; save_pretrained writes the checkpoint's names). Renamings only: tensors that
    loading converts (fuses) keep their names."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: the model's names are the checkpoint's
        return {name: name for name in names}
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    out = {}
    for name in names:
        renamed = rename_source_key(name, renamings, [], model.base_model_prefix, held)[0]
        out[name] = renamed if renamed in held or name not in held else name  # as loading falls back to the name
    return out


__all__ = ["MemoryPlan", "MemoryPlanError", "MergeSession", "MergeStep", "plan_memory"]
