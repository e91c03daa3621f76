"""Input Gram matrices of a model's linear layers, for RegMean and Bayesian Model Merging
(merge_engine/methods/regression.py).

For a linear module y = x W^T (+ b) with input features d, its Gram is G = sum_t x_t^T x_t [d, d], over
every real token t of the data (padding excluded through the attention mask), accumulated in fp32 by
`ops.accumulate_gram`. Modules that read the very same input tensor (a Llama layer's q/k/v
projections; its gate/up projections) share one Gram, stored once; sharing is found by running the
first example once and grouping the modules whose forward received the same tensor object.

Memory stays bounded by `max_gram_bytes`: modules are split, in execution order, into passes whose
fp32 Grams fit the budget; each pass runs the whole data set, accumulating only its own modules' Grams
(the forward stops after its last module), writes them to the output's shards and frees them. A 7B
Llama's fp32 Grams (~22 GB) with an 8 GB budget take three passes, stopping after layers 12, 23 and 32:
about 2.1 forwards of the data in all, and never more than 8 GB of Grams in memory.

Output: a Grams folder, in the format merge_engine/io/grams.py describes and reads.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from merge_engine.devices import resolve_device
from merge_engine.distributed import (
    Ranks,
    check_same_plan,
    current_ranks,
    data_digest,
    every_rank,
    own_items,
    rank_device,
    sum_counts,
    sum_over_ranks,
)
from merge_engine.dtypes import DTYPES, STATS_DTYPES
from merge_engine.errors import MergeEngineError
from merge_engine.io.grams import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, stored_shape, to_stored
from merge_engine.io.writer import ShardedWriter, check_output_dir
from merge_engine.ops.gram import accumulate_gram, mirror_upper_
from merge_engine.progress import progress_bar
from merge_engine.stats.data import load_data
from merge_engine.stats.models import (
    auto_class_of,
    check_inputs_apart,
    check_model_folder,
    checkpoint_naming,
    load_model,
    resolve_max_length,
    vocab_size_of,
)


@dataclass
class GramModule:
    """A linear module whose input Gram is collected: (name, module, weight layout)."""

    name: str
    module: torch.nn.Module
    in_features: int
    transposed: bool  # weight stored [in, out] (transformers' Conv1D)


@dataclass
class GramGroup:
    """Modules reading one input; `name` (of the Gram) is the first one's."""

    modules: list[GramModule]

    @property
    def name(self) -> str:
        return self.modules[0].name

    @property
    def d(self) -> int:
        return self.modules[0].in_features


def linear_modules(model: torch.nn.Module, exclude: str | None = None,
                   stored_name: Callable[[str], str] | None = None) -> list[GramModule]:
    """Every nn.Linear (and transformers Conv1D) of the model, minus names matching the `exclude` regex and
    modules whose weight is tied to an earlier parameter (GPT-2's lm_head: the checkpoint holds no weight
    of its own for a merge to regress). stored_name (models.checkpoint_naming) names each module as its weight
    is named in the checkpoint."""
    found = []
    owned = {name for name, _ in model.named_parameters()}  # tied parameters appear once, under their first owner
    for name, module in model.named_modules():
        if f"{name}.weight" not in owned:
            continue
        if stored_name:
            name = stored_name(f"{name}.weight").removesuffix(".weight")
        if isinstance(module, torch.nn.Linear):
            found.append(GramModule(name, module, module.in_features, False))
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            found.append(GramModule(name, module, module.weight.shape[0], True))
    if exclude:
        found = [m for m in found if not re.search(exclude, m.name)]
    if not found:
        raise MergeEngineError("the model has no linear module to collect Grams for")
    return found


# ---- sharing ----

def group_by_input(model: torch.nn.Module, modules: list[GramModule], batch: dict[str, torch.Tensor]) -> list[GramGroup]:
    """Groups of modules whose forward received the same input tensor, in execution order (one forward)."""
    seen: dict[int, tuple[torch.Tensor, GramGroup]] = {}  # id -> (tensor kept alive, so ids stay unique)
    order: list[GramGroup] = []

    def hook(m: GramModule):
        def record(module, args):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, GramGroup([]))
                order.append(seen[id(x)][1])
            seen[id(x)][1].modules.append(m)
        return record

    handles = [m.module.register_forward_pre_hook(hook(m)) for m in modules]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    repeated = sorted({m.name for g in order for m in g.modules if sum(m in h.modules for h in order) > 1})
    if repeated:
        raise MergeEngineError(f"linear module(s) {repeated[:3]} run more than once per forward (shared "
                               "weights); their Grams are not defined per input; exclude them")
    unreached = sorted({m.name for m in modules} - {m.name for g in order for m in g.modules})
    if unreached:
        raise MergeEngineError(f"linear module(s) {unreached[:3]} never ran in a forward pass; exclude them")
    return order


def split_into_passes(groups: list[GramGroup], max_gram_bytes: int) -> list[list[GramGroup]]:
    """Consecutive groups whose fp32 Grams fit max_gram_bytes (a larger Gram gets a pass of its own)."""
    passes: list[list[GramGroup]] = [[]]
    used = 0
    for g in groups:
        size = g.d * g.d * 4
        if passes[-1] and used + size > max_gram_bytes:
            passes.append([])
            used = 0
        passes[-1].append(g)
        used += size
    return passes


# ---- accumulation ----

class _StopForward(Exception):
    """Raised after the last hooked module of a pass: the rest of the forward is not needed."""


def token_mask(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask laid out like the activations' leading dims: per token (some models flatten the
    tokens), or None for one row per example (a pooler or classification head reads every example)."""
    if x.shape[:-1] == attention_mask.shape:
        return attention_mask
    if x.dim() == 2 and x.shape[0] == attention_mask.numel():
        return attention_mask.reshape(-1)
    if x.dim() == 2 and x.shape[0] == attention_mask.shape[0]:
        return None
    raise MergeEngineError(f"a linear input of shape {list(x.shape)} does not line up with the batch's tokens "
                           f"{list(attention_mask.shape)}")


def accumulate_pass(model: torch.nn.Module, groups: list[GramGroup], batches, progress,
                    rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """fp32 Grams (upper triangle mirrored) of one pass's groups over every batch; rows[name] counts the
    input rows each summed."""
    device = next(model.parameters()).device
    grams = {g.name: torch.zeros(g.d, g.d, dtype=torch.float32, device=device) for g in groups}
    state = {}
    last = groups[-1].name

    def hook(name: str):
        def add(module, args):
            x = args[0].detach()
            mask = token_mask(x, state["mask"])
            accumulate_gram(grams[name], x, mask)
            rows[name] = rows.get(name, 0) + (x.shape[0] if mask is None else state["tokens"])
            if name == last:
                raise _StopForward
        return add

    handles = [g.modules[0].module.register_forward_pre_hook(hook(g.name)) for g in groups]
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                state["mask"] = batch["attention_mask"].bool()
                state["tokens"] = int(state["mask"].sum())  # once per batch, not a device sync per module
                try:
                    model(**batch)
                except _StopForward:
                    pass
                progress.update(len(batch["input_ids"]))
    finally:
        for h in handles:
            h.remove()
    for gram in grams.values():
        mirror_upper_(gram)
    return grams


# ---- the whole run ----

@dataclass
class GramOptions:
    batch_size: int = 8
    max_length: int | None = None  # None: 512, or the model's positions when fewer (models.resolve_max_length)
    max_examples: int | None = None
    device: str = "auto"
    dtype: torch.dtype | None = None  # the model's compute dtype; None: as stored
    gram_dtype: str = "float32"  # storage: float32 or bfloat16 (accumulation is always fp32)
    packed: bool = False  # store the upper triangle only
    max_gram_bytes: int = 8 * 10**9  # fp32 Grams held in memory at once
    exclude: str | None = None  # regex of module names to leave out
    overwrite: bool = False
    quiet: bool = False
    shard_size: int = 5 * 10**9
    tokenizer: object = field(default=None, repr=False)


def compute_grams(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], writer_factory,
                  options: GramOptions, ranks: Ranks | None = None,
                  stored_name: Callable[[str], str] | None = None) -> dict:
    """Collect every Gram pass by pass, handing each to the writer from writer_factory(groups). With ranks,
    each rank sums its share of the batches and the sums are added up across ranks (in float64) before
    the writer gets them; every rank returns the whole run's counts."""
    device = next(model.parameters()).device
    first = {k: v[:1].to(device) for k, v in batches[0].items()}  # the same on every rank
    model.eval()
    groups = group_by_input(model, linear_modules(model, options.exclude, stored_name), first)
    passes = split_into_passes(groups, options.max_gram_bytes)
    # steps: a rank that fails (rank 0 writing) stops the others at the step's end, not in the sums' collectives
    with every_rank(ranks, "opening the output"):
        writer = writer_factory(groups)
    batches = own_items(batches, ranks)
    local_rows: dict[str, int] = {}
    with progress_bar(total=sum(len(b["input_ids"]) for b in batches) * len(passes), unit="ex",
                      desc=f"grams ({len(passes)} pass(es))", disable=options.quiet) as bar:
        for groups_of_pass in passes:
            with every_rank(ranks, "collecting the Grams"):
                grams = accumulate_pass(model, groups_of_pass, batches, bar, local_rows)
            for gram in grams.values():
                gram.copy_(sum_over_ranks(ranks, gram))
            with every_rank(ranks, "writing the Grams"):
                for name, gram in grams.items():
                    writer(name, gram)
            del grams  # the next pass' Grams take their place in memory
    rows = sum_counts(ranks, local_rows)
    counts = sum_counts(ranks, {"examples": sum(len(b["input_ids"]) for b in batches),
                                "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))})
    return {**counts, "modules": {m.name: {"gram": gram_tensor_name(g), "in_features": m.in_features,
                                           "transposed": m.transposed, "rows": rows.get(g.name, 0)}
                                  for g in groups for m in g.modules}}


def gram_tensor_name(group: GramGroup) -> str:
    return f"{group.name}.gram"


def check_exclude(exclude: str | None) -> None:
    """The --exclude regex compiles (checked before the model is loaded)."""
    if exclude is not None:
        try:
            re.compile(exclude)
        except re.error as e:
            raise MergeEngineError(f"--exclude {exclude!r}: not a valid regular expression ({e})") from None


def collect_grams(model_dir: str, data_path: str, out_dir: str, options: GramOptions | None = None) -> dict:
    """Validate the inputs, load model and data, collect the Grams and save them; return the manifest.
    Nothing is written unless the whole run succeeds. Called on every rank of an initialised
    torch.distributed process group, the ranks share the batches and rank 0 writes the folder."""
    options = options or GramOptions()
    ranks = current_ranks()
    with every_rank(ranks, "checking the inputs and loading the model"):
        if options.gram_dtype not in STATS_DTYPES:
            raise ValueError(f"gram_dtype must be one of {list(STATS_DTYPES)}, got {options.gram_dtype!r}")
        check_exclude(options.exclude)
        check_inputs_apart(out_dir, model_dir, data_path, options.tokenizer)
        check_output_dir(out_dir, options.overwrite)
        device = rank_device(resolve_device(options.device), ranks)
        config = check_model_folder(model_dir)
        options = replace(options, max_length=resolve_max_length(model_dir, config, options.max_length))
        data = load_data(data_path, model_dir if options.tokenizer is None else options.tokenizer,
                         options.max_length, options.max_examples, vocab_size_of(config))
        model = load_model(model_dir, options.dtype, device, auto_class_of(model_dir))
    if ranks:  # the digest costs a pass over the data
        check_same_plan(ranks, data_digest(model_dir, data.sequences, options, out_dir))
    state = {}
    writes = ranks is None or ranks.leader

    def open_writer(groups: list[GramGroup]):
        dtype = DTYPES[options.gram_dtype]
        entries = [(gram_tensor_name(g), dtype, stored_shape(g.d, options.packed)) for g in groups]
        if writes:
            state["writer"] = ShardedWriter(out_dir, entries, options.shard_size, options.overwrite)
        by_name = {g.name: gram_tensor_name(g) for g in groups}

        def write(name: str, gram: torch.Tensor) -> None:
            if writes:
                state["writer"].write(by_name[name], to_stored(gram, options.gram_dtype, options.packed))
        return write

    try:
        summary = compute_grams(model, data.batches(options.batch_size), open_writer, options, ranks,
                                checkpoint_naming(model, model_dir))
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "model": os.path.abspath(model_dir),
                    "examples": summary["examples"], "tokens": summary["tokens"], "dtype": options.gram_dtype,
                    "packed": options.packed, "max_length": options.max_length, "modules": summary["modules"]}
        with every_rank(ranks, "saving the Grams"):
            if writes:
                state["writer"].add_file(MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
                state["writer"].commit()
    except BaseException:
        if "writer" in state:
            state["writer"].abort()
        raise
    return manifest
