"""Planning: from a validated config and the inputs' headers to a list of per-tensor jobs.

Everything that can be checked without tensor data is checked here, and all problems are reported
together: model folders and safetensors headers, layer ranges, tensors missing from an input,
shape mismatches, and every parameter resolved for every tensor.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_engine.config import WEIGHT_SHAPED_SIDE_INPUTS, MergeConfig, Slice, parameter_scopes
from merge_engine.dtypes import dtype_name
from merge_engine.errors import CheckpointError, ConfigError
from merge_engine.io import fishers
from merge_engine.io.checkpoint import Checkpoint, split_layer_name
from merge_engine.io.experts import with_expert_layout
from merge_engine.io.grams import gram_folder
from merge_engine.io.hub_cache import resolve_references
from merge_engine.io.lora import CONV1D_MODEL_TYPES, open_model
from merge_engine.model_modules import DEFAULT_MODULE, MODULES, ModuleLayout, module_layouts, module_of
from merge_engine.parameters import Scope, resolve
from merge_engine.vocabulary import RowRecipe, Vocabulary, build_vocabulary, truncated_rows

log = logging.getLogger("merge_engine")
# Outside the layers, embeddings and position encodings come before them (the first slice's sources and
# parameters merge them), norms and heads after (the last slice's), as mergekit's architectures list them
# (GPT-NeoX's output head is embed_out; ChatGLM's rotary inverse frequencies and Jais's ALiBi slopes come first;
# so do a vision tower's patch convolution and the norm after it, and Whisper's audio convolutions).
_PRE_LAYER_MARKERS = ("embed", "wte", "wpe", "rotary_pos_emb", "relative_pe", "patch_conv", "ln_pre", "layernorm_pre",
                      ".conv1.", ".conv2.")
_POST_LAYER_MARKERS = ("embed_out",)


def before_layers(name: str) -> bool:
    """Whether a tensor outside the layers is merged with the first slice (else with the last)."""
    return any(m in name for m in _PRE_LAYER_MARKERS) and not any(m in name for m in _POST_LAYER_MARKERS)


# Output heads an input may lack because its config ties them to its embeddings. mergekit's architectures list
# them as optional weights with these tied names: planned when any input has one, and an input without it merges
# its embeddings in its place.
TIED_HEADS = {
    "lm_head.weight": ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                       "transformer.wte.weight", "wte.weight", "backbone.embeddings.weight"),
    "output.weight": ("model.tok_embeddings.weight",),
}
_POSITION_MARKERS = ("position", "wpe")  # position embeddings: never vocabulary-indexed, whatever their size
_MAX_LISTED_PROBLEMS = 50


@dataclass
class TensorJob:
    """One output tensor: where its inputs are, and the resolved parameters of its merge."""

    out_name: str
    inputs: list[tuple[Checkpoint, str]]  # (model, tensor name in that model), in config order
    base_index: int | None
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    copy_only: bool = False  # non-floating buffers are copied from the first input unchanged
    rows: RowRecipe | None = None  # vocabulary-indexed (dim 0): inputs aligned to the output's tokens
    # side-input kind -> per input, where its statistics tensor is (None: that input has none)
    side: dict[str, list[tuple[Checkpoint, str] | None]] = field(default_factory=dict)
    slice_index: int = 0  # the config slice it comes from, and its layer position t there: enough to resolve
    t: float = 0.0  # its parameters again under another config of the same models (session.py)
    in_out: bool = False  # a 2-D weight stored [in, out] (transformers' Conv1D, in the GPT-2 family), not [out, in]
    outside_layers: bool = False  # embeddings, final norm, head: filters match the output's name (filter_names)

    def side_reads(self) -> list[tuple[Checkpoint, str]]:
        return [ref for refs in self.side.values() for ref in refs if ref is not None]

    @property
    def bytes_in(self) -> int:
        return sum(ckpt.tensors[name].nbytes for ckpt, name in self.inputs + self.side_reads())


@dataclass
class MergePlan:
    config: MergeConfig
    models: dict[str, Checkpoint]
    side: dict[str, Checkpoint] = field(default_factory=dict)  # side-input folders (Fishers...) by path
    jobs: list[TensorJob] = field(default_factory=list)
    num_layers: int | None = 0  # layers of the output model (None: several stacks, each kept as it is)
    layer_sources: list[tuple[str, int]] = field(default_factory=list)  # per output layer: its slice's first
    # source (model, layer), whose per-layer config entries (layer_types...) it takes
    module_layers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # a modules: config's: per module
    # with one layer stack, its layer_sources
    missing_side: dict[str, list[str]] = field(default_factory=dict)  # side folder -> tensors it lacks
    side_used: set[str] = field(default_factory=set)  # side folders (as the config names them) holding some tensor's statistics
    missing_grams: dict[str, list[str]] = field(default_factory=dict)  # Gram folder -> weights others' Grams cover
    vocabulary: Vocabulary | None = None  # the output tokenizer, when the config sets one
    # mergekit's --unsafe-truncate-embeddings: without a tokenizer setting, vocabulary-indexed tensors keep
    # the rows every input has (truncate_vocabulary), and truncated_rows is how many that is
    truncate_vocabulary: bool = False
    truncated_rows: int | None = None
    unaligned: list[str] = field(default_factory=list)  # tensors whose rows the vocabulary could not place

    @property
    def donor(self) -> Checkpoint:
        """The model whose config.json and side files the output starts from."""
        first = self.config.slice_base(self.config.slices[0]) or self.config.slices[0].sources[0].model
        return self.models[self.config.base_model or first]

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(j.out_name, j.out_dtype, j.shape) for j in self.jobs]


def open_models(cfg: MergeConfig, lora_merge_dtype: torch.dtype | None = None, expert_layout: str = "fused"
                ) -> tuple[dict[str, Checkpoint], dict[str, Checkpoint]]:
    """Open every referenced model and side-input folder (headers only); report all unreadable ones together.
    lora_merge_dtype: what BASE+ADAPTER models are read in (io/lora.py: LoraCheckpoint). expert_layout: how MoE
    experts are read (io/experts.py)."""
    models, problems = {}, []
    for ref in cfg.referenced_models():
        try:
            models[ref] = with_expert_layout(open_model(ref, lora_merge_dtype), expert_layout)
        except CheckpointError as e:
            problems.append(str(e))
    side = open_side_folders(cfg, problems)
    for token, setting in (cfg.tokenizer.tokens.items() if cfg.tokenizer else ()):
        if setting.source is not None and setting.source.model not in (None, *models):
            problems.append(f"tokenizer.tokens[{token!r}]: {setting.source.model} is not a model of this merge")
    if problems:
        raise ConfigError(problems, "inputs")
    return models, side


def open_side_folders(cfg: MergeConfig, problems: list[str]) -> dict[str, Checkpoint]:
    """Every side-input folder the config names (Fishers, Grams...), by path, headers and manifests checked; the
    unreadable ones appended to problems."""
    side = {}
    for path, kinds in _side_kinds(cfg).items():
        try:
            side[path] = Checkpoint(path)
            if "grams" in kinds:
                gram_folder(path)  # its manifest, checked against the stored Grams
            if "fisher" in kinds:
                fishers.check_fisher_folder(side[path])
        except CheckpointError as e:
            problems.append(str(e))
    return side


def _side_kinds(cfg: MergeConfig) -> dict[str, set[str]]:
    """Side-input folder -> the kinds of statistics the config reads from it."""
    needed = cfg.method.side_inputs if cfg.method else ()
    out: dict[str, set[str]] = {}
    for s in cfg.slices:
        for src in s.sources:
            for kind, path in src.side.items():
                if kind in needed:
                    out.setdefault(path, set()).add(kind)
    return out


def _no_architecture(ckpt) -> str:
    """Why a model's architecture is unknown, for the message comparing them."""
    return "? (no architectures in its config.json)" if ckpt.config else "? (no config.json)"


def build_plan(cfg: MergeConfig, allow_crimes: bool = False, truncate_vocabulary: bool = False,
               lora_merge_dtype: torch.dtype | None = None, expert_layout: str = "fused",
               hub_cache: str | None = None) -> MergePlan:
    """The merge's jobs, from cfg (its Hub references taken from the Hugging Face cache, or hub_cache: plan.config
    names local folders) and its inputs' headers."""
    cfg = resolve_references(cfg, hub_cache)
    plan = MergePlan(cfg, *open_models(cfg, lora_merge_dtype, expert_layout), truncate_vocabulary=truncate_vocabulary)
    if cfg.tokenizer:
        plan.vocabulary = build_vocabulary(cfg.tokenizer, plan.models, cfg.referenced_models()[0])
    problems: list[str] = []
    architectures = {ref: tuple(m.config.get("architectures") or ()) for ref, m in plan.models.items()}
    if len(set(architectures.values())) > 1 and not allow_crimes:
        problems.append("inputs have different architectures (" + ", ".join(
            f"{ref}: {'/'.join(a) or _no_architecture(plan.models[ref])}" for ref, a in architectures.items())
            + "); pass --allow-crimes to merge anyway")
    layer_index = {ref: _layer_index(ckpt) for ref, ckpt in plan.models.items()}
    known = len(problems)
    layouts = _module_layouts(plan, problems)
    if len(problems) > known:
        raise ConfigError(problems, "inputs")
    if layouts is None:
        _plan_whole_model(plan, layer_index, problems)
    else:
        _plan_modules(plan, layouts, layer_index, problems)
    if plan.vocabulary and plan.jobs and not plan.unaligned and not any(job.rows for job in plan.jobs):
        problems.append("the config sets a tokenizer, but no tensor has as many rows as its model's vocab_size ("
                        + ", ".join(f"{ref}: {n}" for ref, n in plan.vocabulary.vocab_size.items())
                        + "), so none can be aligned to the output's tokens: does config.json's vocab_size "
                        "match the embeddings?")
    warn_unmatched_filters(cfg, plan.jobs)
    check_side_folders(plan, problems)
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise ConfigError(shown, "inputs")
    return plan


def check_side_folders(plan: MergePlan, problems: list[str]) -> None:
    """Once every tensor is planned: a side folder (Fishers, Grams...) holding statistics of no tensor of the merge
    is a problem (made for another model); tensors the others lack are merged without them, with a warning."""
    refused = set()  # folders matching no tensor (made for another model): no warning that tensors go without them
    for path, kinds in _side_kinds(plan.config).items():
        if path not in plan.side_used:
            what = "the Gram of no weight" if "grams" in kinds else f"the {'/'.join(sorted(kinds)).title()} of no tensor"
            problems.append(f"{path}: holds {what} of this merge (collected from another model?)")
            refused.add(plan.side[path].path)
    for folder, names in ((f, n) for f, n in plan.missing_grams.items() if f not in refused):
        log.warning("%s has no Gram for %d weight(s) that other models' Grams cover (%s%s); those are merged by the "
                    "wrapped method (fallback or anchor), without the regression", folder, len(names),
                    ", ".join(names[:3]), ", ..." if len(names) > 3 else "")
    for folder, names in ((f, n) for f, n in plan.missing_side.items() if f not in refused):
        log.warning("%s lacks %d tensor(s) (%s%s); they are merged without it (see the method's missing_* "
                    "parameter)", folder, len(names), ", ".join(names[:3]), ", ..." if len(names) > 3 else "")


def _plan_whole_model(plan: MergePlan, layer_index: dict, problems: list[str]) -> None:
    """Every tensor of the first model: outside the layers with the first or last slice, the layers slice by slice
    (several stacks: each in place, _plan_stacks)."""
    cfg = plan.config
    first, last = cfg.slices[0], cfg.slices[-1]
    template = plan.models[first.sources[0].model]
    stacks = layer_index[first.sources[0].model]
    one_stack = len(stacks) <= 1  # (several: _plan_stacks compares them, and slices are refused)
    if one_stack:
        problems += _layer_count_problems(plan, layer_index)
    ranges = [_layer_ranges(s, plan.models, problems) for s in cfg.slices] if one_stack and not problems else []
    if problems:
        raise ConfigError(problems, "inputs")
    outside = _outside_names(plan, template.tensors, last)
    pre = [n for n in outside if before_layers(n)]
    _plan_outside(plan, first, pre, problems)
    if len(stacks) > 1 and (len(cfg.slices) > 1 or any(src.layer_range for src in first.sources)):
        modules = module_layouts(template.config)
        sizes = ", ".join(f"{prefix}: {len(layers)}" for prefix, layers in stacks.items())
        problems.append(f"{first.sources[0].model} has {len(stacks)} layer stacks ({sizes}), so layer slices are "
                        "ambiguous; merge it with a models: config" + (
                            f", or a modules: config with slices in its modules ({', '.join(modules)})"
                            if modules else ""))
    elif len(stacks) > 1:
        plan.num_layers = None
        _plan_stacks(plan, first, list(stacks), layer_index, problems)
    else:
        plan.layer_sources = _plan_slices(plan, cfg.slices, next(iter(stacks), "model.layers"), layer_index, ranges,
                                          problems)
        plan.num_layers = len(plan.layer_sources)
    _plan_outside(plan, last, [n for n in outside if n not in pre], problems)
    first_model = first.sources[0].model
    _check_unplanned_outside(plan, first_model, [ref for ref in plan.models if ref != first_model], set(outside),
                             problems)


def _outside_names(plan: MergePlan, names, last: Slice, belongs=lambda name: True) -> list[str]:
    """The tensors among names that lie outside the layers, and the output heads (TIED_HEADS, those that belong)
    that the last slice's sources hold though the template lacks them."""
    outside = [n for n in names if split_layer_name(n) is None]
    return outside + [n for n in TIED_HEADS if belongs(n) and n not in outside
                      and any(n in plan.models[src.model].tensors for src in last.sources)]


def _plan_outside(plan: MergePlan, s: Slice, names: list[str], problems: list[str]) -> None:
    """Tensors outside the layers, merged from slice s's sources at t = 0."""
    for name in names:
        _plan_tensor(plan, s, name, _input_names(plan, s, name), 0.0, problems, outside_layers=True)


def _module_layouts(plan: MergePlan, problems: list[str]) -> dict[str, ModuleLayout] | None:
    """The modules of a `modules:` config's architecture (None: not such a config, or its only module is
    `default`, the whole model)."""
    cfg = plan.config
    if not cfg.modules:
        return None
    ref = cfg.slices[0].sources[0].model
    layouts = module_layouts(plan.models[ref].config)
    architecture = "/".join(plan.models[ref].config.get("architectures") or ()) or _no_architecture(plan.models[ref])
    known = list(layouts or [DEFAULT_MODULE])
    unknown = [m for m in cfg.modules if m not in known]
    if unknown:
        several = f"the architectures with several: {', '.join(sorted(MODULES))}"
        named = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        problems.append(f"modules: {named} {'is not a module' if len(unknown) == 1 else 'are not modules'} of {ref} "
                        f"({architecture}), whose modules are {', '.join(known)}" + ("" if layouts else f" ({several})"))
    return layouts


def _plan_modules(plan: MergePlan, layouts: dict[str, ModuleLayout], layer_index: dict, problems: list[str]) -> None:
    """A `modules:` config: each module's tensors from its own slices, its layers numbered from 0, as mergekit plans
    them. Tensors of modules the config leaves out (and of none) are not written, as in mergekit."""
    cfg = plan.config
    plan.num_layers = None
    template = plan.models[cfg.slices[0].sources[0].model]
    left_out: dict[str, int] = {}
    for name in template.tensors:
        module = module_of(layouts, name)
        if module not in cfg.modules:
            left_out[module or "(no module)"] = left_out.get(module or "(no module)", 0) + 1
    if left_out:
        log.warning("%s: the config's modules: leaves out %s; their tensors are not written (mergekit writes only the "
                    "modules a modules: config names), and the output loads with them missing", template.path,
                    " and ".join(f"{module} ({n} tensor{'s' if n > 1 else ''})" for module, n in left_out.items()))
    for module in cfg.modules:
        slices = [s for s in cfg.slices if s.module == module]
        layer_sources = _plan_module(plan, module, slices, layouts, layer_index, problems)
        if layer_sources is not None:
            plan.module_layers[module] = layer_sources


def _plan_module(plan: MergePlan, module: str, slices: list[Slice], layouts: dict[str, ModuleLayout],
                 layer_index: dict, problems: list[str]) -> list[tuple[str, int]] | None:
    """One module, as a one-stack model is planned: its tensors outside the layers with its first or last slice,
    its layers slice by slice. The output layers' sources (None: the module has no stack, or several)."""
    first, last = slices[0], slices[-1]
    template = plan.models[first.sources[0].model]
    names = [n for n in template.tensors if module_of(layouts, n) == module]
    if not names:  # (else the module would be left out of the output without a word)
        problems.append(f"{first.where}: {first.sources[0].model} holds no tensor of module '{module}' (named "
                        f"{' or '.join(p + '*' for p in layouts[module].prefixes)})")
        return None
    outside = _outside_names(plan, names, last, lambda name: module_of(layouts, name) == module)
    stacks = list(dict.fromkeys(parts[0] for parts in map(split_layer_name, names) if parts))
    pre = [n for n in outside if before_layers(n)]
    _plan_outside(plan, first, pre, problems)
    layer_sources = None
    if len(stacks) == 1:
        ranges = [_module_layer_ranges(s, stacks[0], layer_index, problems) for s in slices]
        if all(ranges):
            layer_sources = _plan_slices(plan, slices, stacks[0], layer_index, ranges, problems)
    elif len(slices) > 1 or any(src.layer_range for s in slices for src in s.sources):
        problems.append(f"{first.where}: module '{module}' has " + (f"{len(stacks)} layer stacks ({', '.join(stacks)})"
                        if stacks else "no layers") + ", so it takes one models: entry, not layer slices")
    elif stacks:
        _plan_stacks(plan, first, stacks, layer_index, problems)
    _plan_outside(plan, last, [n for n in outside if n not in pre], problems)
    others = [ref for ref in dict.fromkeys(src.model for s in slices for src in s.sources)
              if ref != first.sources[0].model]
    _check_unplanned_outside(plan, first.sources[0].model, others, set(outside), problems,
                             lambda name: module_of(layouts, name) == module)
    return layer_sources


def _module_layer_ranges(s: Slice, prefix: str, layer_index: dict, problems: list[str]
                         ) -> list[tuple[int, int]] | None:
    """Each source's layer range in a module's stack (a models: entry: all its layers), checked against the layers
    its tensors hold; None with the problems appended."""
    ranges, known = [], len(problems)
    for src in s.sources:
        held = sorted(layer_index[src.model].get(prefix, {}))
        if held != list(range(len(held))):
            problems.append(f"{src.model}: the layers of '{prefix}' are not numbered 0 to {len(held) - 1} (missing "
                            f"tensors?)")
        a, b = src.layer_range or (0, len(held))
        if b > len(held):
            problems.append(f"{s.where}[{src.model}]: layer_range [{a}, {b}) is outside the {len(held)} layers of "
                            f"'{prefix}'")
        ranges.append((a, b))
    if len({b - a for a, b in ranges}) > 1:
        problems.append(f"{s.where}: models with different layer counts in '{prefix}' cannot be merged layer by layer: "
                        + ", ".join(f"{src.model} ({b - a})" for src, (a, b) in zip(s.sources, ranges)))
    return ranges if len(problems) == known else None


def _plan_slices(plan: MergePlan, slices: list[Slice], prefix: str, layer_index: dict,
                 ranges: list[list[tuple[int, int]]], problems: list[str]) -> list[tuple[str, int]]:
    """The layers of one stack, slice by slice: output layers numbered in order from 0, t over each slice. Per
    output layer, its slice's first source (model, layer), whose per-layer config entries it takes."""
    layer_sources: list[tuple[str, int]] = []
    for s, lr in zip(slices, ranges):
        n = lr[0][1] - lr[0][0]
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            src_layers = [a + offset for a, _ in lr]
            suffixes = layer_index[s.sources[0].model].get(prefix, {}).get(src_layers[0], {})
            problems += _lacking_in_template(s, prefix, src_layers, layer_index)
            for suffix in suffixes:
                names = [layer_index[src.model].get(prefix, {}).get(layer, {}).get(suffix, f"<layer {layer}>.{suffix}")
                         for src, layer in zip(s.sources, src_layers)]
                _plan_tensor(plan, s, f"{prefix}.{len(layer_sources)}.{suffix}", names, t, problems)
            layer_sources.append((s.sources[0].model, src_layers[0]))
    return layer_sources


def _lacking_in_template(s: Slice, prefix: str, src_layers: list[int], layer_index: dict) -> list[str]:
    """A tensor the slice's first source lacks in this layer, though another source has it here and the first
    has it in its other layers: a model missing a weight (its suffixes decide the layer's tensors, so the weight
    would silently be left out of the output)."""
    first = layer_index[s.sources[0].model].get(prefix, {})
    own, anywhere = first.get(src_layers[0], {}), {x for layer in first.values() for x in layer}
    lacking = {x for src, layer in zip(s.sources[1:], src_layers[1:])
               for x in layer_index[src.model].get(prefix, {}).get(layer, {}) if x not in own and x in anywhere}
    return [f"{s.sources[0].model}: tensor '{prefix}.{src_layers[0]}.{x}' is missing (its other layers and the other "
            "inputs have it)" for x in sorted(lacking)]


def _plan_stacks(plan: MergePlan, s: Slice, prefixes: list[str], layer_index: dict, problems: list[str]) -> None:
    """The layers of several stacks (a vision tower beside a language model, an encoder and a decoder), as mergekit
    does for multi-module architectures: one models: slice s, each stack merged layer by layer in place, t over that
    stack's layers."""
    template = {prefix: layer_index[s.sources[0].model][prefix] for prefix in prefixes}
    sizes = ", ".join(f"{prefix}: {len(layers)}" for prefix, layers in template.items())
    for src in s.sources:
        theirs = {prefix: len(layer_index[src.model].get(prefix, {})) for prefix in prefixes}
        if theirs != {prefix: len(layers) for prefix, layers in template.items()}:
            problems.append(f"{src.model}: layer stacks {theirs} differ from {s.sources[0].model}'s ({sizes})")
    if problems:
        return
    for prefix, layers in template.items():
        n = len(layers)
        for position, i in enumerate(sorted(layers)):
            for suffix in layers[i]:
                names = [layer_index[src.model][prefix].get(i, {}).get(suffix, f"<layer {i}>.{suffix}")
                         for src in s.sources]
                _plan_tensor(plan, s, f"{prefix}.{i}.{suffix}", names, position / (n - 1) if n > 1 else 1.0,
                             problems)


def _layer_index(ckpt: Checkpoint) -> dict[str, dict[int, dict[str, str]]]:
    """layer stack (the prefix before the layer number) -> layer -> {suffix after the number: tensor name}."""
    index: dict[str, dict[int, dict[str, str]]] = {}
    for name in ckpt.tensors:
        parts = split_layer_name(name)
        if parts:
            index.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = name
    return index


MAX_UNSEEN_LAYERS = 100_000  # a layer count no tensor backs: far above any real model's


def _input_names(plan: MergePlan, s: Slice, name: str) -> list[str]:
    """Each source's tensor for the output tensor `name` outside the layers: its own, or for a head its tied
    embeddings (TIED_HEADS) when it has no head."""
    names = []
    for src in s.sources:
        tensors = plan.models[src.model].tensors
        tied = next((t for t in TIED_HEADS.get(name, ()) if name not in tensors and t in tensors), None)
        if tied:
            log.info("%s has no %s (its embeddings are tied): its %s is merged in its place, as mergekit does",
                     src.model, name, tied)
        names.append(tied or name)
    return names


def _layer_count_problems(plan: MergePlan, layer_index: dict) -> list[str]:
    """A model whose config.json claims layers its tensors lack is refused (the merge would name layers that do
    not exist, or plan a loop over a count of 10**12); layers beyond the claim are not merged, with a warning."""
    problems = []
    for ref, ckpt in plan.models.items():
        stacks = layer_index[ref]
        if not ckpt.tensors:
            problems.append(f"{ref}: the model folder holds no tensors")
        if not stacks and ckpt.num_layers > MAX_UNSEEN_LAYERS:  # slices would still count them one by one
            problems.append(f"{ref}: config.json says {ckpt.num_layers} layers, and no tensor is a layer's")
        if len(stacks) != 1:  # several stacks: _plan_stacks compares them; none: every tensor is merged by name
            continue
        held, claimed = set(next(iter(stacks.values()))), ckpt.num_layers
        lacking = claimed - sum(1 for i in held if i < claimed)
        if lacking > 0:
            first = [i for i in range(min(claimed, len(held) + 3)) if i not in held][:3]
            problems.append(f"{ref}: config.json says {claimed} layers, but the tensors of {lacking} of them are "
                            f"missing (layer {', '.join(map(str, first))}{', ...' if lacking > 3 else ''})")
        beyond = sorted(i for i in held if i >= claimed)
        if beyond:
            log.warning("%s: the tensors of %d layer(s) beyond the %d that config.json says (from layer %d) are not "
                        "merged", ref, len(beyond), claimed, beyond[0])
    return problems


def _check_unplanned_outside(plan: MergePlan, first: str, others: list[str], planned: set[str], problems: list[str],
                             belongs: Callable[[str], bool] = lambda name: True) -> None:
    """The first model's tensors outside the layers decide the output's (of a module's, with belongs: its tensors);
    another input's that it lacks are not merged (mergekit also merges only its architecture's weights): named, in
    case the first model is the one missing them. A weight that two or more other inputs all have is refused: the
    first model lacks part of the architecture (a truncated index, say), and the output would load with it
    randomly initialised."""
    held_by_all = set.intersection(*(set(plan.models[o].tensors) for o in others)) if len(others) > 1 else set()
    missing = {n for n in held_by_all if n not in planned and split_layer_name(n) is None
               and n.endswith((".weight", ".bias")) and belongs(n)}
    problems += [f"{first}: tensor '{n}' is missing (every other input has it)" for n in sorted(missing)]
    for ref in others:
        unplanned = sorted(n for n in plan.models[ref].tensors
                           if split_layer_name(n) is None and n not in planned and n not in missing and belongs(n))
        if unplanned:
            log.warning("%s: %d tensor(s) that the first model lacks are not merged (%s%s)", ref, len(unplanned),
                        ", ".join(unplanned[:3]), ", ..." if len(unplanned) > 3 else "")


def _layer_ranges(s: Slice, models: dict[str, Checkpoint], problems: list[str]) -> list[tuple[int, int]]:
    ranges = []
    for src in s.sources:
        n = models[src.model].num_layers
        a, b = src.layer_range or (0, n)
        if b > n:
            problems.append(f"{src.model}: layer_range [{a}, {b}) is outside the model's {n} layers")
        ranges.append((a, b))
    if len({b - a for a, b in ranges}) > 1:
        problems.append("models with different layer counts cannot be merged layer by layer: "
                        + ", ".join(f"{src.model} ({b - a})" for src, (a, b) in zip(s.sources, ranges)))
    return ranges


def _plan_tensor(plan: MergePlan, s: Slice, out_name: str, names: list[str], t: float, problems: list[str],
                 outside_layers: bool = False) -> None:
    cfg = plan.config
    models = [src.model for src in s.sources]
    base = cfg.slice_base(s)
    infos = []
    for model, name in zip(models, names):
        info = plan.models[model].tensors.get(name)
        if info is None:
            problems.append(f"{plan.models[model].path}: tensor '{name}' is missing (needed for '{out_name}')")
        infos.append(info)
    if None in infos:
        return
    ref = infos[models.index(base)] if base in models else infos[0]
    known = len(problems)
    rows = _vocabulary_rows(plan, models, infos, base, out_name, problems) if outside_layers else None
    if len(problems) > known:  # rows that cannot be aligned: comparing the shapes would only add false problems
        plan.unaligned.append(out_name)
        return
    for model, info in zip(models, infos):
        if info.shape[1 if rows else 0:] != ref.shape[1 if rows else 0:]:
            problems.append(f"{info.file}: tensor '{info.name}' has shape {list(info.shape)} but "
                            f"{ref.file} has {list(ref.shape)}")
    method = cfg.method
    dtypes = [i.dtype for i in infos]
    floating = all(d.is_floating_point for d in dtypes)
    problem = _dtype_problem(infos, cfg.dtype)
    if problem:
        problems.append(f"{problem} (needed for '{out_name}')")
        return
    compute = cfg.dtype or promoted_dtype(dtypes)
    try:
        shared, per_model = resolve_parameters(cfg, s, filter_names(out_name, names, outside_layers), out_name, t,
                                               compute if floating else None)
    except ValueError as e:
        problems.append(f"{e} (tensor '{out_name}')")
        return
    side = {kind: _side_refs(plan, kind, s, names, [i.shape for i in infos], shared, problems)
            for kind in method.side_inputs} if floating else {}
    for kind in (k for k in WEIGHT_SHAPED_SIDE_INPUTS if rows and None in side.get(k, ())):  # aligned with it
        problems.append(f"'{out_name}': its rows are aligned to the output vocabulary, which needs every input's "
                        f"{kind} of it")
    out = cfg.out_dtype or method.output_dtype(compute)
    layout_from = plan.models[base if base in models else models[0]]
    in_out = len(ref.shape) == 2 and layout_from.config.get("model_type") in CONV1D_MODEL_TYPES
    plan.jobs.append(TensorJob(
        out_name, [(plan.models[m], n) for m, n in zip(models, names)],
        models.index(base) if base in models else None, shared, per_model,
        compute if floating else dtypes[0], out if floating else dtypes[0],
        (rows.rows, *ref.shape[1:]) if rows else ref.shape, copy_only=not floating, side=side, rows=rows,
        slice_index=next(i for i, x in enumerate(cfg.slices) if x is s), t=t, in_out=in_out,
        outside_layers=outside_layers))


def filter_names(out_name: str, names: list[str], outside_layers: bool) -> list[str]:
    """The names a parameter's filter matches for a tensor's inputs: outside the layers the output's name, also for
    an input whose tied embeddings stand in (as mergekit matches it); in the layers each input's own."""
    return [out_name] * len(names) if outside_layers else list(names)


def warn_unmatched_filters(cfg: MergeConfig, jobs: list[TensorJob]) -> None:
    """Name each {filter, value} entry whose filter is in no tensor name of the merge: it sets nothing (mergekit is
    silent), as a filter written for names the output does not have (Mixtral's `block_sparse_moe`, whose experts
    are fused under `mlp`) would otherwise leave its tensors at the next scope's value unnoticed."""
    names = {job.out_name for job in jobs} | {name for job in jobs for _, name in job.inputs}
    for where, params in parameter_scopes(cfg):
        for param, setting in (params or {}).items():
            for entry in [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else []:
                flt = entry.get("filter") if isinstance(entry, dict) else None
                if isinstance(flt, str) and flt != "*" and not any(flt in name for name in names):
                    log.warning("%s.%s: filter '%s' is in no tensor name of this merge, so its value sets nothing",
                                where, param, flt)


def resolve_parameters(cfg: MergeConfig, s: Slice, names: list[str], out_name: str, t: float,
                       compute: torch.dtype | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One tensor's method parameters (shared, per input model) from the config's scopes; ValueError when
    one is missing or invalid, or when together they make the merge in `compute` meaningless (None: a
    tensor that is copied, not merged)."""
    method, base = cfg.method, cfg.slice_base(s)
    shared = {p.name: resolve(p, cfg.scopes(s), out_name, t, out_name) for p in method.shared_params}
    per_model = []
    for src, name in zip(s.sources, names):
        scopes = [other.parameters for other in s.sources if other.model == src.model] + cfg.scopes(s)
        per_model.append({p.name: resolve(p, scopes, name, t, f"{src.model}: '{name}'")
                          for p in method.model_params if src.model != base or p.scope == Scope.INPUT})
    checked = per_model
    if method.inner and method.inner.base == "ignored":  # a wrapped method merges the inputs less the base
        checked = [m for src, m in zip(s.sources, per_model) if src.model != base]
    problem = compute is not None and method.tensor_problem and method.tensor_problem(shared, checked, compute)
    if problem:
        raise ValueError(f"merge method '{method.name}': {problem}")
    return shared, per_model


def _vocabulary_rows(plan: MergePlan, models: list[str], infos: list, base: str | None, out_name: str,
                     problems: list[str]) -> RowRecipe | None:
    """The row recipe of a tensor outside the layers whose dim 0 is its inputs' vocabulary (as many rows
    as each model's config vocab_size); None for any other tensor, or without a configured tokenizer."""
    vocab = plan.vocabulary
    if any(marker in out_name for marker in _POSITION_MARKERS):
        return None
    if vocab is None:
        return _truncated_rows(plan, models, infos, out_name) if plan.truncate_vocabulary else None
    is_vocab = [len(i.shape) > 0 and i.shape[0] == vocab.vocab_size[m] for m, i in zip(models, infos)]
    if not any(is_vocab):
        return None
    if not all(is_vocab):
        problems.append(f"'{out_name}': dim 0 is the vocabulary (vocab_size rows) in "
                        + ", ".join(m for m, v in zip(models, is_vocab) if v) + " but not in "
                        + ", ".join(m for m, v in zip(models, is_vocab) if not v))
        return None
    if not all(i.dtype.is_floating_point for i in infos):
        return None
    return vocab.recipe(models, base, [i.shape[0] for i in infos], f"'{out_name}'", problems)


def _truncated_rows(plan: MergePlan, models: list[str], infos: list, out_name: str) -> RowRecipe | None:
    """mergekit's unsafe vocabulary truncation of a tensor whose dim 0 is each input's config vocab_size
    and differs between inputs: the rows every input has, the same token ids assumed to mean the same
    tokens (nothing checks it)."""
    sizes = [i.shape[0] if len(i.shape) else None for i in infos]
    if len(set(sizes)) == 1 or any(s != plan.models[m].config.get("vocab_size") for m, s in zip(models, sizes)):
        return None
    rows = min(sizes)
    log.warning("UNSAFE vocabulary truncation of '%s': %s rows -> %d (--unsafe-truncate-embeddings: token ids "
                "below %d are assumed to mean the same in every input)", out_name, sizes, rows, rows)
    plan.truncated_rows = rows if plan.truncated_rows is None else min(plan.truncated_rows, rows)
    return truncated_rows(len(models), rows)


def _side_refs(plan: MergePlan, kind: str, s: Slice, names: list[str], shapes: list[tuple[int, ...]],
               shared: dict[str, Any], problems: list[str]) -> list[tuple[Checkpoint, str] | None]:
    """Where each input's `kind` statistics for one tensor are: same tensor name in the input's side folder.
    A missing one is None, or a problem when the method's `missing_<kind>` parameter is 'error'."""
    refs, lacking = [], []
    for src, name, shape in zip(s.sources, names, shapes):
        path = src.side.get(kind, "")
        folder = plan.side.get(path)
        if kind == "grams":
            refs.append(_gram_ref(folder, name, shape, problems) if folder else None)
            plan.side_used.update([path] if refs[-1] else [])  # as the config names it (folder.path is absolute)
            if folder and not refs[-1]:
                lacking.append(folder.path)
            continue
        info = folder.tensors.get(name) if folder else None
        if folder and info is None:
            if shared.get(f"missing_{kind}") == "error":
                problems.append(f"{folder.path}: no {kind} tensor '{name}' (missing_{kind}: error)")
            plan.missing_side.setdefault(folder.path, []).append(name)
        elif info is not None and info.shape != shape:
            problems.append(f"{info.file}: {kind} tensor '{name}' has shape {list(info.shape)} but the weight "
                            f"has {list(shape)}")
        refs.append((folder, name) if info is not None else None)
        plan.side_used.update([path] if info is not None else [])
    if lacking and any(refs):  # another model's Grams have this weight: it falls back to the wrapped method
        for path in lacking:
            plan.missing_grams.setdefault(path, []).append(names[0])
    return refs


def _gram_ref(folder: Checkpoint, name: str, shape: tuple[int, ...], problems: list[str]) -> tuple[Checkpoint, str] | None:
    """Where a linear weight's input Gram is (grams.json maps modules to Gram tensors); None for any other tensor."""
    entry = gram_folder(folder.path).module_of(name)
    if entry is None:
        return None
    in_features = shape[0] if entry["transposed"] else shape[-1]
    if len(shape) != 2 or in_features != entry["in_features"]:
        problems.append(f"{folder.path}: the Gram of '{name}' is for {entry['in_features']} input features but the "
                        f"weight has shape {list(shape)}")
        return None
    return folder, entry["gram"]


def _dtype_problem(infos: list, load_dtype: torch.dtype | None) -> str | None:
    """Why one output tensor's inputs cannot be merged as stored: floating-point tensors with integer ones (the
    integer one would be copied, or promoted, silently), or 8-bit floats without a config dtype to load them in
    (torch neither promotes nor computes with them)."""
    floating = [i for i in infos if i.dtype.is_floating_point]
    if floating and len(floating) < len(infos):
        other = next(i for i in infos if not i.dtype.is_floating_point)
        return (f"{other.file}: tensor '{other.name}' is {dtype_name(other.dtype)} but {floating[0].file} has "
                f"{dtype_name(floating[0].dtype)}; floating-point tensors are merged only with floating-point ones")
    narrow = next((i for i in floating if i.dtype.itemsize == 1), None)
    if narrow is not None and load_dtype is None:
        return (f"{narrow.file}: tensor '{narrow.name}' is {dtype_name(narrow.dtype)}; set the config's dtype "
                "(bfloat16, float16, float32) to merge 8-bit floats")
    return None


def promoted_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype torch promotes these to (a merge's compute dtype where the config sets none)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out
