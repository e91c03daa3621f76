"""The merge engine, top-down: plan -> read -> compute -> write.

    merge(config, out_dir)                      validate, plan, run, move into place
      build_plan(config)                        per-tensor jobs from the config and input headers
      ShardedWriter(out_dir, plan.entries())    output layout fixed before any compute
      _Pipeline.run(plan.jobs)
        read:    prefetch threads read the next jobs' inputs into reused host buffers (io/buffers.py;
                 pinned on CUDA), adding a BASE+ADAPTER input's LoRA update there (io/lora.py)
        stage:   (CUDA) host-to-device copies on a side stream, one job ahead of compute
        compute: the method's merge on the device, cast to the output dtype (the CPU kernels write
                 into reused host buffers too)
        write:   a writer thread puts each result at its final offset in its shard, then hands the
                 job's host buffers back to the read threads
      write_side_files + commit                 config.json, tokenizer, merge config; rename

Under torch.distributed (merge() called on every rank of an initialised process group), every rank plans,
the plans' digests are compared, each rank runs the pipeline on the output shards assigned to it, rank 0
writes the side files, and the steps end with every rank's status (distributed.py).

Memory stays bounded by (prefetch depth + 2) tensor groups, whatever the number of layers.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import operator
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import yaml
from tqdm.auto import tqdm

from merge_engine.card import model_card
from merge_engine.chat_templates import resolve_chat_template
from merge_engine.config import WEIGHT_SHAPED_SIDE_INPUTS, MergeConfig, load_config, parse_config
from merge_engine.devices import resolve_device
from merge_engine.distributed import (
    JobProgress,
    Ranks,
    check_same_device_type,
    check_same_plan,
    commit_shared_writer,
    current_ranks,
    digest,
    every_rank,
    gather,
    open_shared_writer,
    own_shards,
    rank_device,
)
from merge_engine.dtypes import DTYPES, dtype_name
from merge_engine.errors import ConfigError, MergeEngineError, out_of_memory
from merge_engine.extras import require
from merge_engine.interrupts import Terminated
from merge_engine.io.buffers import BufferPool
from merge_engine.io.checkpoint import DIRECT_IO_MODES, LAYER_COUNT_KEYS
from merge_engine.io.experts import EXPERT_LAYOUTS
from merge_engine.io.hub_cache import cache_folder, local_reference
from merge_engine.io.lora import open_model
from merge_engine.io.untrusted import inside_folder, is_file_name, is_int, open_regular
from merge_engine.io.writer import ShardedWriter, check_output_apart, check_output_dir, plan_shards
from merge_engine.methods import MergeMethod, TensorGroup
from merge_engine.model_modules import config_scope, module_layouts, with_config_value
from merge_engine.ops import backends
from merge_engine.plan import TIED_HEADS, MergePlan, TensorJob, build_plan
from merge_engine.progress import progress_bar
from merge_engine.vocabulary import (
    TOKENIZER_FILES,
    TOKENIZER_SETTINGS,
    align_rows,
    chat_template_of,
    load_tokenizer,
    save_tokenizer,
    set_vocab_size,
)

log = logging.getLogger("merge_engine")

# the donor's generation settings and its image and video processors' settings (mergekit copies the processors' for
# its multimodal architectures: Qwen2-VL, Mistral 3, Gemma 3, Llama 4...), copied whenever the donor has them
SIDE_FILES_FROM_BASE = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
                        "video_preprocessor_config.json")
CONFIG_COPY_NAME = "mergekit_config.yml"  # the name model cards and hubs look for
NON_FINITE_WARNINGS = 3  # tensors written with NaN or Inf warned of one by one; the rest counted in one line


@dataclass
class MergeOptions:
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto"
    out_shard_size: int = 5 * 10**9  # bytes; 0: no limit, one shard (as mergekit's --out-shard-size 0)
    random_seed: int = 0
    copy_tokenizer: bool = True
    overwrite: bool = False
    prefetch: int = 2  # tensor groups read ahead of compute
    # reads: "auto" plain reads of what the page cache holds, O_DIRECT for the rest; "on" O_DIRECT for all;
    # "off" plain reads (io/page_cache.py). Writes: O_DIRECT unless "off" (io/writer.py). O_DIRECT only
    # where the filesystem allows it.
    direct_io: str = "auto"
    quiet: bool = False
    allow_crimes: bool = False  # merge models whose architectures differ
    # mergekit's --unsafe-truncate-embeddings: without a tokenizer setting, embeddings and LM heads whose
    # vocab_size differs between inputs keep the rows all of them have (token ids assumed to agree)
    unsafe_truncate_embeddings: bool = False
    # mergekit's --lora-merge-dtype: BASE+ADAPTER models are read cast to this dtype (every floating-point
    # tensor) and their adapters merged in it (io/lora.py); None: in the base's own dtypes
    lora_merge_dtype: torch.dtype | None = None
    # how MoE experts are merged and written: "fused" as transformers 5 holds them and mergekit 0.1.5 writes
    # them (one gate_up_proj and one down_proj per layer, io/experts.py); "checkpoint": one tensor per expert
    expert_layout: str = "fused"
    # the Hugging Face cache that Hub references (org/name[@revision]) are found in (io/hub_cache.py), a path; None:
    # huggingface_hub's (HF_HUB_CACHE). mergekit's --transformers-cache
    hub_cache: str | os.PathLike | None = None
    write_model_card: bool = True  # a README.md model card in the output (merge_engine/card.py), as mergekit's default


@dataclass
class MergeReport:
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    out_dir: str
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each step of merge(), in order (this rank's)
    ranks: list[RankFigures] = field(default_factory=list)  # each rank's share of a distributed merge

    def summary(self) -> str:
        gbps = (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9) / 1e9
        return "\n".join([f"merged {self.tensors} tensors: read {self.bytes_read / 1e9:.3f} GB, wrote "
                          f"{self.bytes_written / 1e9:.3f} GB in {self.seconds:.2f} s ({gbps:.2f} GB/s) -> {self.out_dir}",
                          *(f"  {r.summary()}" for r in self.ranks)])


@dataclass
class RankFigures:
    """What one rank of a distributed merge did."""

    rank: int
    host: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float  # from its start to the end of its part (the rename excluded)

    def summary(self) -> str:
        return (f"rank {self.rank} ({self.host}): {self.tensors} tensors, read {self.bytes_read / 1e9:.3f} GB, "
                f"wrote {self.bytes_written / 1e9:.3f} GB in {self.seconds:.2f} s")


def merge(config: MergeConfig | dict | str | os.PathLike, out_dir: str | os.PathLike,
          options: MergeOptions | None = None) -> MergeReport:
    """Run a merge config (a parsed MergeConfig, a config mapping or a YAML path) into out_dir. Called on every
    rank of an initialised torch.distributed process group, it runs one merge over all of them (distributed.py)."""
    options = given_options(options)
    out_dir = os.fspath(out_dir)
    ranks = current_ranks()
    lap = _Laps()
    with every_rank(ranks, "planning"):
        hub_cache = cache_folder(options.hub_cache)
        cfg = as_merge_config(config, hub_cache)
        lap("config")
        device = rank_device(check_options(out_dir, options), ranks)
        plan = build_plan(cfg, options.allow_crimes, options.unsafe_truncate_embeddings, options.lora_merge_dtype,
                          options.expert_layout, hub_cache)
        check_output_outside_inputs(out_dir, plan)
        check_donor_files(plan)
        check_chat_template_extra(plan, options)
    check_same_plan(ranks, digest(plan.jobs, plan.entries(), options.out_shard_size, options.random_seed,
                                  options.lora_merge_dtype, options.overwrite, os.path.realpath(out_dir)))
    check_same_device_type(ranks, device)
    own_shards, jobs = rank_share(plan, options.out_shard_size, ranks)
    writer = open_output(out_dir, plan, own_shards, options, ranks)
    lap("plan")
    try:
        with every_rank(ranks, "merging"):
            # the ranks' progress exchange starts first: a rank that fails before its first job (loading the
            # kernels, making a CUDA stream) tells the others there, who would otherwise wait for it to join
            with progress_bar(total=sum(j.bytes_in for j in plan.jobs), unit="B", unit_scale=True, desc="merging",
                              disable=options.quiet or not writer.maker) as bar, job_progress(bar, ranks) as advance:
                load_kernels(device)
                lap("kernel load")
                bytes_read = _Pipeline(plan, jobs, writer, device, options, ranks).run(advance)
            check_inputs_unchanged(plan)
            lap("merge")
            if writer.maker:
                write_side_files(plan, writer, options)
            lap("side files")
            writer.flush()
            lap("fsync")
        figures = RankFigures(ranks.rank if ranks else 0, ranks.host if ranks else "", len(jobs), bytes_read,
                              writer.bytes_written, lap.total())
        commit_shared_writer(ranks, writer)
        lap("rename")
    except BaseException:
        writer.abort()
        raise
    return whole_job_report(figures, ranks, writer.out_dir, lap)  # the command line prints its summary


def whole_job_report(figures: RankFigures, ranks: Ranks | None, out_dir: str, lap: _Laps) -> MergeReport:
    """This process' figures; with ranks, the sums of every rank's, each rank's listed."""
    every = gather(ranks, figures) if ranks else [figures]
    return MergeReport(sum(f.tensors for f in every), sum(f.bytes_read for f in every),
                       sum(f.bytes_written for f in every), lap.total(), out_dir, lap.seconds, every if ranks else [])


def as_merge_config(config, hub_cache: str | None = None) -> MergeConfig:
    """A MergeConfig from one, a config mapping or a YAML path (its problems and its model folders' listed, Hub
    references looked up in hub_cache), whose copy in the output can be written."""
    if isinstance(config, (str, os.PathLike)):
        return load_checked_config(os.fspath(config), hub_cache=hub_cache)
    if isinstance(config, dict):
        config = parse_config(config)
    if not isinstance(config, MergeConfig):
        raise TypeError(f"config must be a MergeConfig, a mapping or a YAML path, got a {type(config).__name__}")
    config_copy_text(config)  # refused now, not once every tensor is merged
    return config


class _ConfigDumper(yaml.SafeDumper):
    """A config mapping as YAML: torch dtypes by name, as configs spell them (parse_config takes them), and numbers
    and strings of other kinds (numpy's float64 is a float) as plain ones."""


_ConfigDumper.add_representer(torch.dtype, lambda dumper, dtype: dumper.represent_str(dtype_name(dtype)))
for _kind in (int, float, str):
    _ConfigDumper.add_multi_representer(_kind, lambda dumper, value, kind=_kind: dumper.represent_data(kind(value)))


def config_copy_text(config: MergeConfig) -> str:
    """The config as the output's copy holds it: its text as read, or its mapping as YAML (ConfigError naming a
    value YAML cannot hold)."""
    if config.text is not None:
        return config.text
    try:
        return yaml.dump(config.raw, Dumper=_ConfigDumper, sort_keys=False)
    except yaml.representer.RepresenterError as e:
        raise ConfigError([f"{e.args[-1]!r} cannot be written as YAML (the output's {CONFIG_COPY_NAME}): "
                           "use strings, numbers, lists and mappings"]) from None


def given_options(options: MergeOptions | None, default: MergeOptions | None = None) -> MergeOptions:
    """The caller's options (default, or MergeOptions(), when None), integers of other kinds as ints."""
    if options is None:
        options = MergeOptions() if default is None else default
    if not isinstance(options, MergeOptions):
        raise TypeError(f"options must be a MergeOptions, got a {type(options).__name__}")
    return taken_as_given(options)


def taken_as_given(options: MergeOptions) -> MergeOptions:
    """The options with integers of other kinds (numpy's, a 0-d tensor's) as ints, and an integral float shard
    size (2e9) as an int. Anything else is left for check_options to name."""
    return dataclasses.replace(options, out_shard_size=as_int(options.out_shard_size, floats=True),
                               prefetch=as_int(options.prefetch), random_seed=as_int(options.random_seed))


def as_int(value, floats: bool = False):
    """value as a Python int where it is an integer of another kind (or, with floats, an integral float); else
    value itself (a bool stays a bool: the checks refuse it)."""
    if floats and isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return value if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return value


def check_options(out_dir: str, options: MergeOptions) -> torch.device:
    """What can be refused before planning; the device the merge runs on."""
    for name in ("copy_tokenizer", "overwrite", "quiet", "allow_crimes", "unsafe_truncate_embeddings", "write_model_card"):
        if not isinstance(getattr(options, name), bool):
            raise MergeEngineError(f"MergeOptions.{name} must be True or False, got {getattr(options, name)!r}")
    if not is_int(options.out_shard_size) or options.out_shard_size < 0:
        raise MergeEngineError(f"MergeOptions.out_shard_size must be a number of bytes (0: no limit, one shard), got "
                               f"{options.out_shard_size!r}")
    if not is_int(options.prefetch) or options.prefetch < 1:
        raise MergeEngineError(f"MergeOptions.prefetch must be an integer of at least 1, got {options.prefetch!r}")
    if not isinstance(options.device, (str, torch.device)):
        raise MergeEngineError(f"MergeOptions.device must be a string (cpu, cuda, cuda:N or auto) or a torch.device, "
                               f"got {options.device!r}")
    check_output_dir(out_dir, options.overwrite)
    if options.direct_io not in DIRECT_IO_MODES:
        raise MergeEngineError(f"direct_io must be one of {', '.join(DIRECT_IO_MODES)}, not {options.direct_io!r}")
    check_expert_layout(options.expert_layout)
    check_seed_and_lora_dtype(options.random_seed, options.lora_merge_dtype)
    device = resolve_device(options.device)
    if device.type == "cuda":
        check_gpu_backend_choice()
    return device


def check_expert_layout(expert_layout) -> None:
    if expert_layout not in EXPERT_LAYOUTS:
        raise MergeEngineError(f"expert_layout must be one of {', '.join(EXPERT_LAYOUTS)}, not {expert_layout!r}")


def check_seed_and_lora_dtype(random_seed, lora_merge_dtype) -> None:
    """MergeOptions' (and a session's) random_seed and lora_merge_dtype, refused before anything is read."""
    if not is_int(random_seed) or not -2**63 <= random_seed < 2**63:  # the generator's key: a 64-bit signed seed
        raise MergeEngineError(f"random_seed must be an integer in [-2**63, 2**63), got {random_seed!r}")
    if lora_merge_dtype is not None and lora_merge_dtype not in DTYPES.values():
        raise MergeEngineError(f"lora_merge_dtype must be one of torch.{', torch.'.join(DTYPES)} or None, "
                               f"not {lora_merge_dtype!r}")


def rank_share(plan: MergePlan, shard_size: int, ranks: Ranks | None) -> tuple[list[int] | None, list[TensorJob]]:
    """The output shards this rank writes (None: all) and their jobs: shards go to ranks balanced by bytes
    read plus bytes written."""
    groups = plan_shards(plan.entries(), shard_size)
    own = own_shards(ranks, [sum(job_bytes(plan.jobs[j]) for j in group) for group in groups])
    return own, plan.jobs if own is None else [plan.jobs[j] for i in own for j in groups[i]]


def job_bytes(job: TensorJob) -> int:
    """What a job moves: its inputs read and its output written."""
    return job.bytes_in + math.prod(job.shape) * job.out_dtype.itemsize


def open_output(out_dir: str, plan: MergePlan, own_shards: list[int] | None, options: MergeOptions,
                ranks: Ranks | None) -> ShardedWriter:
    """The writer of this rank's shards (distributed.open_shared_writer)."""
    return open_shared_writer(ranks, lambda join: ShardedWriter(
        out_dir, plan.entries(), options.out_shard_size, options.overwrite, direct=options.direct_io != "off",
        own_shards=own_shards, join=join))


class _Laps:
    """Seconds spent in each named step, each step timed from the end of the one before."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def total(self) -> float:
        return self._last - self._start


def load_kernels(device: torch.device) -> None:
    """Load the compiled kernels the merge's device uses now, rather than inside its first tensor (where a
    failure's one warning would interrupt the progress bar); a no-op when they are turned off."""
    if device.type == "cuda":
        backends.gpu_backend()
    else:
        backends.cpu_extension()


def load_checked_config(path: str, strict: bool = False, hub_cache: str | None = None) -> MergeConfig:
    """load_config; when the config has problems, the problems of the model folders it names (missing,
    unreadable headers; Hub references looked up in hub_cache, as the merge would) are listed with them, so that
    one run reports everything."""
    try:
        return load_config(path, strict)
    except ConfigError as e:
        raise ConfigError(e.problems + folder_problems(e.raw, hub_cache), e.source) from None


def folder_problems(raw: object, hub_cache: str | None = None) -> list[str]:
    """What is wrong with the model folders a (possibly invalid) config mapping names, read from headers."""
    modules = raw.get("modules") if isinstance(raw, dict) else None
    containers = [raw] + [m for m in modules.values() if isinstance(m, dict)] if isinstance(modules, dict) else [raw]
    sections = [section for c in containers if isinstance(c, dict)
                for section in [c] + (c["slices"] if isinstance(c.get("slices"), list) else [])]
    refs = []
    for section in (s for s in sections if isinstance(s, dict)):
        refs.append(section.get("base_model"))
        entries = section.get("models") or section.get("sources") or []
        refs += [e.get("model") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    problems = []
    for ref in dict.fromkeys(r for r in refs if isinstance(r, str) and r and is_file_name(r)):
        try:
            open_model(local_reference(ref, hub_cache)).close()
        except MergeEngineError as e:
            problems.append(str(e))
    return problems


def check_output_outside_inputs(out_dir: str, plan: MergePlan) -> None:
    """The output folder apart from every folder the merge reads (io/writer.py: check_output_apart)."""
    check_output_apart(out_dir, sorted(input_folders(plan)))


def check_inputs_unchanged(plan: MergePlan) -> None:
    """No input file was written into while it was read (its tensors could mix two versions of it)."""
    for ckpt in (*plan.models.values(), *plan.side.values()):
        ckpt.check_unchanged()


def input_folders(plan: MergePlan) -> set[str]:
    """Every folder a merge reads: models, LoRA adapters and patches, side inputs, a tokenizer source."""
    folders = {f for c in (*plan.models.values(), *plan.side.values()) for f in c.folders}
    source = plan.config.tokenizer.source if plan.config.tokenizer else None
    return folders | ({source} if source not in (None, "union", "base") else set())


def check_gpu_backend_choice() -> None:
    try:
        backends.gpu_backend_choice()
    except ValueError as e:  # before any tensor is read, not in the middle of a merge
        raise MergeEngineError(str(e)) from None


@contextmanager
def job_progress(bar: tqdm, ranks: Ranks | None) -> Iterator[Callable[[int], None]]:
    """advance(nbytes) after each job: the bar counts this process' jobs, or with ranks every rank's (rank 0
    shows it), and a rank stops early when another fails (distributed.JobProgress)."""
    if ranks is None:
        yield bar.update
        return
    progress = JobProgress(ranks, lambda done: bar.update(done - bar.n))
    try:
        yield progress.add
    except BaseException as e:
        progress.end(failed=True, terminated=isinstance(e, Terminated))
        raise
    progress.end(failed=False)


class _Pipeline:
    """One rank's jobs (all of them in a single process), read, computed and written as in the module's docstring."""

    def __init__(self, plan: MergePlan, jobs: list[TensorJob], writer: ShardedWriter, device: torch.device,
                 options: MergeOptions, ranks: Ranks | None = None):
        self.plan, self.jobs, self.writer, self.device, self.options = plan, jobs, writer, device, options
        self.ranks = ranks
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # room for two of the largest jobs' buffers (inputs and result) waiting to be reused
        largest = max(map(job_bytes, jobs), default=0)
        self.buffers = BufferPool(2 * largest, pin_memory=self.cuda)
        self.non_finite: list[str] = []  # the tensors written with NaN or Inf values (warn_non_finite)

    def run(self, advance: Callable[[int], None]) -> int:
        """The jobs' bytes read; advance(nbytes) after each job (job_progress)."""
        jobs = self.jobs
        depth = self.options.prefetch
        with ThreadPoolExecutor(depth, thread_name_prefix="me-read") as readers, \
                ThreadPoolExecutor(1, thread_name_prefix="me-write") as write_pool:
            reads: deque[Future] = deque(readers.submit(self.read, j) for j in jobs[:depth])
            writes: deque[Future] = deque()
            staged = None
            for i, job in enumerate(jobs):
                host = reads.popleft().result()
                if i + depth < len(jobs):
                    reads.append(readers.submit(self.read, jobs[i + depth]))
                current = (job, self.stage(host), host)
                if staged:
                    self.compute_and_write(*staged, write_pool, writes)
                staged = current
                advance(job.bytes_in)
            if staged:
                self.compute_and_write(*staged, write_pool, writes)
            while writes:  # (a loop variable holding a failed write's future would keep its error's frames alive)
                writes.popleft().result()
        unwarned = self.non_finite[NON_FINITE_WARNINGS:]
        if unwarned:
            log.warning("%d more tensor(s) hold NaN or Inf merged values (%s%s)", len(unwarned),
                        ", ".join(unwarned[:3]), ", ..." if len(unwarned) > 3 else "")
        return sum(j.bytes_in for j in jobs)

    def read(self, job: TensorJob) -> list[torch.Tensor]:
        """Read a job's inputs, then its side inputs, from disk (in a prefetch thread)."""
        return [self._read_one(ckpt, name) for ckpt, name in job.inputs + job.side_reads()]

    def _read_one(self, ckpt, name: str) -> torch.Tensor:
        try:
            return ckpt.read_pooled(name, self.buffers.take_bytes, self.options.direct_io)
        except Exception as e:  # noqa: BLE001 (torch's allocation failure is a RuntimeError)
            reason = out_of_memory(e)
            if reason is None:
                raise
            raise MergeEngineError(f"{ckpt.path}: tensor '{name}': out of memory reading it ({reason}); a merge holds "
                                   "a few tensor groups at once (--prefetch 1 holds fewer)") from e

    def stage(self, host: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Start the host-to-device copies on the side stream, so they overlap the previous job's compute; with
        the event that marks them done (None on the CPU)."""
        if not self.cuda:
            return host, None
        with torch.cuda.stream(self.copy_stream):
            staged = [t.to(self.device, non_blocking=True) for t in host]
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        return staged, copied

    def compute_and_write(self, job: TensorJob, staged: tuple[list[torch.Tensor], torch.cuda.Event | None],
                          host: list[torch.Tensor], write_pool: ThreadPoolExecutor, writes: deque[Future]) -> None:
        """Merge one job (staged: its inputs on the device and the event of their copies; host: their host
        buffers) and queue the write."""
        tensors, copied = staged
        if self.cuda:
            compute_stream = torch.cuda.current_stream(self.device)
            # this job's copies only: waiting for the whole side stream would wait for the next job's too, which
            # stage() queued before this call, and no copy would overlap a compute
            compute_stream.wait_event(copied)
            for t in tensors:
                t.record_stream(compute_stream)
        # on the CPU the ops that take `out` write into recycled buffers, given back with the job's once on disk
        result = compute(job, tensors, self.plan.config.method, self.options.random_seed,
                         None if self.cuda else self.buffers.take)
        if self.cuda:
            on_host = self.buffers.take(tuple(result.shape), result.dtype)
            on_host.copy_(result, non_blocking=True)
            done = torch.cuda.Event()
            done.record(compute_stream)
            result = (on_host, done)
        while len(writes) > 2:  # bound the results waiting for the disk
            writes.popleft().result()
        writes.append(write_pool.submit(self._write, job, result, host))

    def _write(self, job: TensorJob, result, host: list[torch.Tensor]) -> None:
        if isinstance(result, tuple):  # CUDA: the copy to host (and so the job's compute) is done after this
            result[1].synchronize()
            result = result[0]
        warning = check_merged_values(job, result, host)
        if warning:  # the first few, then their count at the end: not a line per tensor of a merge that overflows
            if len(self.non_finite) < NON_FINITE_WARNINGS:
                log.warning("%s", warning)
            self.non_finite.append(job.out_name)
        self.writer.write(job.out_name, result)
        self.buffers.give(host + [result])  # nothing reads the inputs or the result any more


def tensor_group(job: TensorJob, tensors: list[torch.Tensor], seed: int = 0, take_output=None) -> TensorGroup:
    """A job's inputs (read in job.inputs + job.side_reads() order) as the group its method merges."""
    inputs, side_tensors = tensors[:len(job.inputs)], iter(tensors[len(job.inputs):])
    side = {kind: [None if ref is None else next(side_tensors) for ref in refs] for kind, refs in job.side.items()}
    inputs = [t.to(job.compute_dtype) for t in inputs]
    if job.rows is not None:  # vocabulary-indexed: every input's rows in the output's token order
        inputs = align_rows(job.rows, inputs)
        side.update({kind: align_rows(job.rows, side[kind]) for kind in WEIGHT_SHAPED_SIDE_INPUTS if kind in side})
    return TensorGroup(job.out_name, inputs, job.base_index,
                       job.shared, job.per_model, seed, side,
                       {kind: [None if ref is None else ref[0].path for ref in refs] for kind, refs in job.side.items()},
                       take_output, [name for _, name in job.inputs], job.in_out)


def non_finite_inputs(job: TensorJob, tensors: list[torch.Tensor]) -> str:
    """Which inputs hold NaN or Inf, by model folder and tensor ('' if none): the ops only know their
    inputs by position. Looked for only once a merge has failed, so it costs nothing otherwise."""
    reads = job.inputs + job.side_reads()
    bad = [(ckpt, name, int((~torch.isfinite(t)).sum())) for (ckpt, name), t in zip(reads, tensors)
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return "; ".join(ckpt.non_finite(name, n) for ckpt, name, n in bad)


def check_merged_values(job: TensorJob, result: torch.Tensor, inputs: list[torch.Tensor]) -> str | None:
    """Refuse a merged tensor holding NaN where an input held NaN or Inf (a corrupt checkpoint, named; the methods
    that order magnitudes refuse such inputs themselves). One sum of the host result finds non-finite values, in
    the write thread (17 ms per 100M bf16 values on the 2-core VM); the inputs are searched only then (an fp16
    sum that overflows costs that search and nothing else). Other non-finite values (an Inf buffer averaged, an
    overflow) are written, as mergekit writes them, with a warning: returned."""
    if not result.is_floating_point() or job.copy_only:
        return None
    if math.isfinite(float(result.sum())):  # in its own dtype: 20x faster than asking for an fp32 result
        return None
    culprits = non_finite_inputs(job, inputs)
    if culprits and bool(torch.isnan(result).any()):
        raise MergeEngineError(f"merging tensor '{job.out_name}' failed: {culprits}")
    bad = int((~torch.isfinite(result)).sum())
    if not bad:  # only the sum overflowed
        return None
    return f"tensor '{job.out_name}': {bad} merged value(s) are NaN or Inf" + (f" ({culprits})" if culprits else "")


def compute(job: TensorJob, tensors: list[torch.Tensor], method: MergeMethod, seed: int = 0,
            take_output=None) -> torch.Tensor:
    """Merge one tensor group on the tensors' device (the ops that take `out` write into buffers from
    take_output(shape, dtype), when given)."""
    if job.copy_only:
        return tensors[0]
    try:
        result = method.merge(tensor_group(job, tensors, seed, take_output))
    except Exception as e:  # noqa: BLE001 (torch and the methods raise many kinds: one line naming the tensor)
        memory = out_of_memory(e)
        if memory:  # (searching the inputs for NaN would allocate again)
            raise MergeEngineError(f"merging tensor '{job.out_name}' failed: out of memory ({memory})") from e
        # its text, not e: a local holding e would keep e's frames (the pipeline's buffers, open inputs) in a cycle
        reason = str(e) if isinstance(e, (ValueError, RuntimeError)) else f"{type(e).__name__}: {e}"
        raise MergeEngineError(f"merging tensor '{job.out_name}' failed: {non_finite_inputs(job, tensors) or reason}") from e
    return result.to(job.out_dtype).contiguous()


def write_side_files(plan: MergePlan, writer: ShardedWriter, options: MergeOptions) -> None:
    """config.json (dtype, layer count and vocabulary size updated), generation and processor configs, tokenizer,
    the merge config and the model card."""
    model_config = output_model_config(plan)
    if model_config:
        writer.add_file("config.json", json.dumps(model_config, indent=2) + "\n")
    for f in SIDE_FILES_FROM_BASE:
        copy_if_present(plan.donor.path, f, writer)
    write_tokenizer(plan, writer, options)
    config_text = config_copy_text(plan.config)
    writer.add_file(CONFIG_COPY_NAME, config_text)
    if options.write_model_card:
        writer.add_file("README.md", model_card(plan.config, config_text))


def output_model_config(plan: MergePlan) -> dict:
    """The output's config.json: the donor's, with the dtype, layer count and vocabulary size of the merge
    ({} when the donor has none)."""
    model_config = dict(plan.donor.config)
    if not model_config:
        return model_config
    out_dtype = written_dtype(plan)
    if out_dtype is not None:
        name = dtype_name(out_dtype)
        for key in ("torch_dtype", "dtype"):  # transformers 5 writes "dtype" (as mergekit's output has it)
            if key in model_config or key == "dtype":
                model_config[key] = name
    for key in LAYER_COUNT_KEYS if plan.num_layers is not None else ():  # (DistilBERT's is n_layers)
        if key in model_config:
            model_config[key] = plan.num_layers
    if plan.num_layers is not None:
        model_config.update(per_layer_entries(plan, "", plan.layer_sources))
    model_config = with_module_layer_counts(plan, model_config)
    planned = {job.out_name for job in plan.jobs}
    if model_config.get("tie_word_embeddings") and any(h in planned and h not in plan.donor.tensors for h in TIED_HEADS):
        # a head merged from inputs that have one, where the donor ties its head to the embeddings: the output has a
        # head of its own, which a loader that ties them would drop (mergekit keeps the donor's setting)
        model_config["tie_word_embeddings"] = False
    if plan.vocabulary or plan.truncated_rows:  # (mergekit leaves a truncation's vocab_size as the donor's)
        set_vocab_size(model_config, plan.vocabulary.rows if plan.vocabulary else plan.truncated_rows)
    return model_config


def written_dtype(plan: MergePlan) -> torch.dtype | None:
    """The dtype most of the output's floating-point elements are written in (None: it has none). A checkpoint can
    store tensors in several dtypes (fp32 norms beside bf16 weights, say), each merged and written in its own: the
    first tensor's dtype need not be the model's."""
    elements: dict[torch.dtype, int] = {}
    for job in plan.jobs:
        if job.out_dtype.is_floating_point:
            elements[job.out_dtype] = elements.get(job.out_dtype, 0) + math.prod(job.shape)
    return max(elements, key=elements.get) if elements else None


PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers", "layers_block_type", "block_types", "attn_type_list",
                         "attention_layers")
# lists of layer indices: the layers that are MoE (Llama 4) or dense among MoE layers (Qwen2/3-MoE)
LAYER_INDEX_CONFIG_KEYS = ("moe_layers", "mlp_only_layers")


def with_module_layer_counts(plan: MergePlan, model_config: dict) -> dict:
    """model_config with each sliced module's layer count (a modules: config), in every config.json key that counts
    that module's layers (Qwen2-VL's language model: num_hidden_layers and text_config.num_hidden_layers), and the
    per-layer lists beside them rebuilt. mergekit sets one key per module, and transformers then loads a Qwen2-VL
    merge of other depth with the layers beyond text_config's count dropped."""
    layouts = module_layouts(model_config) or {}
    for module, layer_sources in plan.module_layers.items():
        if module not in layouts:  # a donor of another architecture (--allow-crimes): its config.json does not count it
            continue
        for key in layouts[module].layer_keys:
            model_config = with_config_value(model_config, key, len(layer_sources))
            scope = key.rpartition(".")[0]
            if config_scope(model_config, scope) is not None:
                rebuilt = per_layer_entries(plan, scope, layer_sources)
                for name, entries in rebuilt.items():
                    model_config = with_config_value(model_config, f"{scope}.{name}".lstrip("."), entries)
    return model_config


def per_layer_entries(plan: MergePlan, scope: str, layer_sources: list[tuple[str, int]]) -> dict:
    """The donor config's lists of one entry per layer (PER_LAYER_CONFIG_KEYS: layer_types, each layer's
    attention; SmolLM3's no_rope_layers...) in its sub-config `scope` ("": the config itself; "text_config"), rebuilt
    for the output's layers (layer_sources): each takes the entry of the layer it was merged from (its slice's first
    source), in that model's config; a list that comes out as the donor's is left as written. mergekit keeps the
    donor's lists, which transformers refuses to load once the layer count has changed. Lists of layer indices
    (LAYER_INDEX_CONFIG_KEYS: moe_layers) are rebuilt the same way: an output layer is listed where the layer it
    was merged from is listed in its model's config. Other lists (token ids) are left as they are."""
    def layer_count(config: dict):
        return next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)

    donor = config_scope(plan.donor.config, scope) or {}
    rebuilt = {}
    for key, entries in donor.items():
        if key not in PER_LAYER_CONFIG_KEYS or not isinstance(entries, list) or len(entries) != layer_count(donor):
            continue
        sources = []
        for ref, layer in layer_sources:
            theirs = config_scope(plan.models[ref].config, scope) or {}
            sources.append((theirs[key] if layer_count(theirs) == len(theirs.get(key) or ()) else entries, layer))
        if all(layer < len(source) for source, layer in sources):
            output_entries = [source[layer] for source, layer in sources]
            if output_entries != entries:
                rebuilt[key] = output_entries
    for key, listed in donor.items():
        if key in LAYER_INDEX_CONFIG_KEYS and isinstance(listed, list) and all(is_int(i) for i in listed):
            theirs = [config_scope(plan.models[ref].config, scope) or {} for ref, _ in layer_sources]
            output_listed = [i for i, ((_, layer), their) in enumerate(zip(layer_sources, theirs))
                             if layer in (their.get(key) if isinstance(their.get(key), list) else listed)]
            if output_listed != listed:
                rebuilt[key] = output_listed
    # GPT-Neo derives attention_layers from these runs: written again only for other layers, since other runs can
    # mean the same layers
    if "attention_layers" in rebuilt and "attention_types" in donor:
        runs = itertools.groupby(rebuilt["attention_layers"])
        rebuilt["attention_types"] = [[[kind], len(list(run))] for kind, run in runs]
    return rebuilt


def write_tokenizer(plan: MergePlan, writer: ShardedWriter, options: MergeOptions) -> None:
    """As mergekit: the built tokenizer whenever the config sets one; otherwise the donor's tokenizer files
    (re-saved with the chat template when the config sets one), unless --no-copy-tokenizer."""
    template = plan.config.chat_template
    tokenizer = plan.vocabulary.tokenizer if plan.vocabulary else None
    if tokenizer is None and not options.copy_tokenizer:
        if template:
            log.warning("chat_template is set but no tokenizer is written (--no-copy-tokenizer); it is not saved")
        return
    if tokenizer is None and template:
        try:
            tokenizer = load_tokenizer(require("transformers", "hf", TOKENIZER_SETTINGS), plan.donor.path)
        except Exception as e:  # noqa: BLE001 (transformers raises many kinds; the merge itself is done)
            log.warning("cannot load the tokenizer of %s to give it the chat template (%s); its files are copied "
                        "as they are", plan.donor.path, e)
            template = None
    if tokenizer is None:
        for f in TOKENIZER_FILES:
            copy_if_present(plan.donor.path, f, writer)
        return
    if template:
        template = resolve_chat_template(template, _model_chat_templates(plan))
    with tempfile.TemporaryDirectory() as tmp:
        for f in save_tokenizer(tokenizer, template, tmp):
            writer.copy_file(os.path.join(tmp, f))


def _model_chat_templates(plan: MergePlan) -> list[str]:
    """The chat template of each input model's tokenizer that has one, in config order (the tokenizers
    the vocabulary already loaded, when the config sets one)."""
    if plan.vocabulary:
        return plan.vocabulary.chat_templates
    transformers = require("transformers", "hf", TOKENIZER_SETTINGS)
    templates = []
    for ref, ckpt in plan.models.items():
        try:
            template = chat_template_of(load_tokenizer(transformers, ckpt.path))
        except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
            log.warning("cannot load the tokenizer of %s (%s)", ref, e)
            continue
        templates += [template] if template else []
    return templates


def check_chat_template_extra(plan: MergePlan, options: MergeOptions) -> None:
    """A chat template for the donor's tokenizer needs transformers to load it: a missing extra is refused before
    any tensor is read (write_tokenizer would otherwise drop the template, with a warning, after the merge)."""
    if plan.config.chat_template and plan.vocabulary is None and options.copy_tokenizer:
        require("transformers", "hf", TOKENIZER_SETTINGS)


def check_donor_files(plan: MergePlan) -> None:
    """The donor's files a merge may copy (its generation config and tokenizer files), checked before any
    tensor is read: inside its folder, and regular files (a FIFO would block the copy, a device never end it)."""
    for filename in (*SIDE_FILES_FROM_BASE, *TOKENIZER_FILES):
        path = inside_folder(plan.donor.path, filename, plan.donor.path)
        if os.path.lexists(path):
            open_regular(path).close()


def copy_if_present(folder: str, filename: str, writer: ShardedWriter) -> None:
    path = inside_folder(folder, filename, folder)  # never copy a file a symlink brings from elsewhere
    if os.path.lexists(path):
        with open_regular(path) as f:  # checked again: the file may have changed since planning
            writer.add_file(filename, f.read())
