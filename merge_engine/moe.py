"""Mixture-of-experts models built from dense ones: mergekit-moe's configs (`merge-engine moe CONFIG OUT`).

A config names a base model and experts: dense models of the base's architecture. The output keeps the base's
attention, norms and embeddings, turns each layer's MLP into experts (expert k's from model k) and adds a router per
layer whose rows, one gate vector per expert, come from the experts' prompts: the base model's hidden states for
them (gate_mode hidden), their summed token embeddings (cheap_embed), or random numbers. Four output architectures,
written as mergekit 0.1.5 writes them: Mixtral, DeepSeek MoE, Qwen MoE (one gated shared expert) and Qwen3 MoE.

The flow, top-down in build_moe: parse and check the config (every problem at once) -> open every model's headers
and plan each output tensor from its sources, checking names, shapes and dtypes before any data is read -> gate
vectors (the only compute) -> copy: each unit of output tensors read, its experts' noise and residual scale applied,
stacked where the architecture fuses experts, cast, and written by the sharded writer into a temporary folder that
is moved into place when complete.

Random numbers (random gates, noise_scale) come from one generator seeded with --random-seed and are drawn in
mergekit's order, so `mergekit-moe --random-seed N` and `merge-engine moe --random-seed N` agree bit for bit
(mergekit without a seed draws from an unseeded generator: its output differs run to run).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from merge_engine.card import moe_card
from merge_engine.config import _dtype, _model_ref, read_yaml_and_text
from merge_engine.engine import check_options, copy_if_present, given_options
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError
from merge_engine.extras import require, transformers_config_errors
from merge_engine.io.buffers import BufferPool
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.hub_cache import cache_folder, local_reference
from merge_engine.io.lora import open_model
from merge_engine.io.writer import ShardedWriter, check_output_apart
from merge_engine.parameters import lax_int
from merge_engine.progress import progress_bar
from merge_engine.vocabulary import load_tokenizer, one_line, save_tokenizer

log = logging.getLogger("merge_engine")

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
RANDOM_GATE_MODES = ("random", "uniform_random")
_TOP_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
CONFIG_COPY_NAME = "mergekit_moe_config.yml"  # mergekit-moe's name for the config it keeps beside the model
ALL_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"


@dataclass(frozen=True)
class Expert:
    """A model whose MLPs become one expert of every layer, and the prompts that route tokens to it."""

    model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None  # Gaussian noise of this standard deviation added to its MLP weights
    residual_scale: float | None = None  # its down projections multiplied by this


@dataclass
class MoEConfig:
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: torch.dtype | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] = field(default_factory=list)
    architecture: str | None = None  # an output architecture's name, or its start ("qwen3"); None: chosen
    text: str = ""  # the YAML it was read from, or its mapping as YAML (kept as mergekit_moe_config.yml)

    def models(self) -> list[str]:
        """Every model reference, the base first, each once."""
        return list(dict.fromkeys([self.base_model, *(e.model for e in self.experts + self.shared_experts)]))

    def gated(self) -> list[Expert]:
        """The experts that get a gate vector: the routed ones, then shared ones with prompts (or random gates)."""
        shared_gated = self.gate_mode in RANDOM_GATE_MODES or any(e.positive_prompts for e in self.shared_experts)
        return self.experts + (self.shared_experts if shared_gated else [])


# ---------------------------------------------------------------------------------------------------- config

def load_moe_config(path: str, strict: bool = False, allow_all_same: bool = False) -> MoEConfig:
    content, text = read_yaml_and_text(path, strict)
    config = parse_moe_config(content, source=path, strict=strict, allow_all_same=allow_all_same)
    config.text = text
    return config


def parse_moe_config(raw: Any, source: str | None = None, strict: bool = False,
                     allow_all_same: bool = False) -> MoEConfig:
    """A mergekit-moe config mapping, checked as mergekit checks it (its schema, then its refusals of configs that
    cannot route: experts without prompts, every expert with the same prompts or the same model); ConfigError lists
    every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(["the config must be a mapping (base_model, experts, gate_mode, ...)"], source)
    problems: list[str] = []
    _unknown(raw, _TOP_KEYS, source or "config", strict, problems)
    base = _model_ref(raw.get("base_model"), "base_model", problems)
    experts = _experts(raw.get("experts"), "experts", strict, problems, required=True)
    shared = _experts(raw.get("shared_experts"), "shared_experts", strict, problems, required=False)
    gate_mode = raw.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        problems.append(f"gate_mode: expected one of {', '.join(GATE_MODES)}, got {gate_mode!r}")
    given = raw.get("experts_per_token", 2)
    per_token = lax_int(given)  # as mergekit's schema reads it: 2, 2.0, "2", "2.0"
    if per_token is None:
        problems.append(f"experts_per_token: expected a whole number, got {given!r}")
        per_token = 1
    architecture = raw.get("architecture")
    if architecture is not None and not isinstance(architecture, str):
        problems.append(f"architecture: expected a name ({', '.join(a.name for a in ARCHITECTURES)}), got "
                        f"{architecture!r}")
    elif architecture and not _named(architecture):
        problems.append(f"architecture: no output architecture is named {architecture!r} (supported: "
                        f"{', '.join(a.name for a in ARCHITECTURES)})")
    cfg = MoEConfig(base or "", experts, gate_mode, _dtype(raw, "dtype", problems), per_token, shared,
                    architecture or None)
    if not problems:
        problems += routing_problems(cfg, allow_all_same)
    if problems:
        raise ConfigError(problems, source, raw)
    cfg.text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)  # (load_moe_config keeps the file's text)
    return cfg


def _unknown(raw: dict, known: set[str], where: str, strict: bool, problems: list[str]) -> None:
    unknown = sorted(map(str, set(raw) - known))
    if unknown and strict:
        problems.append(f"{where}: unknown key(s) {unknown} (mergekit ignores them; --strict refuses them)")
    elif unknown:
        log.warning("%s: ignoring unknown key(s) %s (mergekit ignores them too)", where, unknown)


def _experts(value: Any, key: str, strict: bool, problems: list[str], required: bool) -> list[Expert]:
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        problems.append(f"{key}: expected a list of experts (each a mapping with source_model), got {value!r}")
        return []
    experts = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with source_model, got {entry!r}")
            continue
        _unknown(entry, _EXPERT_KEYS, where, strict, problems)
        model = _model_ref(entry.get("source_model"), f"{where}.source_model", problems)
        experts.append(Expert(model or "", _prompts(entry, "positive_prompts", where, problems),
                              _prompts(entry, "negative_prompts", where, problems),
                              _scale(entry, "noise_scale", where, problems),
                              _scale(entry, "residual_scale", where, problems)))
    return experts


def _prompts(entry: dict, key: str, where: str, problems: list[str]) -> tuple[str, ...]:
    value = entry.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        problems.append(f"{where}.{key}: expected a list of texts, got {value!r}")
        return ()
    return tuple(value)


def _scale(entry: dict, key: str, where: str, problems: list[str]) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, str):  # (pydantic's lax float)
        try:
            value = float(value)
        except ValueError:
            pass
    if type(value) not in (int, float) or not math.isfinite(value):
        problems.append(f"{where}.{key}: expected a finite number, got {value!r}")
        return None
    return float(value)


def routing_problems(cfg: MoEConfig, allow_all_same: bool = False) -> list[str]:
    """mergekit-moe's refusals of configs whose MoE could not route (its is_bad_config), as problems."""
    if cfg.experts_per_token < 1:
        return [f"experts_per_token must be at least 1, got {cfg.experts_per_token}"]
    if len(cfg.experts) < cfg.experts_per_token:
        return [f"experts_per_token is {cfg.experts_per_token} but only {len(cfg.experts)} expert(s) are given"]
    problems = []
    if any(bool(e.positive_prompts) != bool(cfg.shared_experts[0].positive_prompts) for e in cfg.shared_experts):
        problems.append("shared_experts: give positive_prompts to every shared expert or to none")
    if cfg.gate_mode == "random":  # (mergekit checks no more: its uniform_random gates need prompts, as here)
        return problems
    problems += [f"experts[{i}]: positive_prompts are needed to compute its gate (gate_mode {cfg.gate_mode}; "
                 "only gate_mode random needs none)" for i, e in enumerate(cfg.experts) if not e.positive_prompts]
    if problems:
        return problems
    prompts = {(e.positive_prompts, e.negative_prompts) for e in cfg.experts}
    if len(prompts) == 1:
        problems.append("every expert has the same positive and negative prompts: the router could not tell them "
                        "apart (give each expert prompts of what should be routed to it)" if len(cfg.experts) > 1
                        else "a single expert: every token would go to it (give two or more experts)")
    if not allow_all_same and len({e.model for e in cfg.experts}) == 1:
        problems.append(f"every expert is the same model ({cfg.experts[0].model}): the MoE would compute what that "
                        f"model computes at a higher cost (to train it further, pass {ALL_SAME_FLAG})")
    return problems


# ---------------------------------------------------------------------------------------- output architectures

@dataclass(frozen=True)
class Architecture:
    """One output architecture: which inputs it takes and how it names and lays out experts."""

    name: str
    model_type: str  # of config.json
    input_types: tuple[str, ...]
    shared: str  # "none", "ungated" (at most one shared expert, without prompts) or "gated" (exactly one)
    template: str | None  # whose dense tensor list the output keeps (DENSE_LAYER_TENSORS); None: the base's
    fused: tuple[str, ...] = ()  # per-expert projections in the order their noise is drawn (fused layouts), or ()
    shared_infix: str = ""  # ".mlp.shared_expert." / ".mlp.shared_experts."

    def problem(self, cfg: MoEConfig, model_types: dict[str, str]) -> str | None:
        """Why this architecture cannot take the config's models (mergekit's supports_config), or None."""
        shared = cfg.shared_experts
        if self.shared == "none" and shared:
            return f"{self.name} has no shared experts"
        if self.shared == "ungated" and (len(shared) > 1 or any(e.positive_prompts or e.negative_prompts
                                                                 for e in shared)):
            return f"{self.name} takes at most one shared expert, without prompts (its shared expert is not gated)"
        if self.shared == "gated" and len(shared) != 1:
            return f"{self.name} needs exactly one shared expert"
        if self.shared == "gated" and cfg.gate_mode != "random" and not shared[0].positive_prompts:
            return f"{self.name}'s shared expert is gated: give it positive_prompts"
        types = set(model_types.values())
        if len(types) != 1 or not types <= set(self.input_types):
            found = ", ".join(f"{ref}: {t}" for ref, t in model_types.items())
            return f"{self.name} needs every model to be one of {'/'.join(self.input_types)}, all the same ({found})"
        return None


ARCHITECTURES = (
    Architecture("Mixtral", "mixtral", ("llama", "mistral"), "none", "mistral", ("w1", "w2", "w3")),
    Architecture("DeepSeek MoE", "deepseek", ("llama", "mistral"), "ungated", None, (), ".mlp.shared_experts."),
    Architecture("Qwen MoE", "qwen2_moe", ("llama", "mistral", "qwen2"), "gated", "qwen2", (), ".mlp.shared_expert."),
    Architecture("Qwen3 MoE", "qwen3_moe", ("qwen3",), "none", "qwen3", ("gate_proj", "up_proj", "down_proj")),
)
_SOURCE_PROJECTION = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}  # Mixtral's names -> the dense model's

# The dense tensors of one layer of each template, in mergekit's architecture order (the order noise is drawn in
# for per-expert layouts), and the outside ones.
_ATTENTION = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight")
DENSE_LAYER_TENSORS = {
    "llama": ("input_layernorm.weight", *_ATTENTION, "post_attention_layernorm.weight", "mlp.up_proj.weight",
              "mlp.gate_proj.weight", "mlp.down_proj.weight"),
    "qwen2": ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "post_attention_layernorm.weight", "self_attn.k_proj.bias", "self_attn.k_proj.weight",
              "self_attn.o_proj.weight", "self_attn.q_proj.bias", "self_attn.q_proj.weight", "self_attn.v_proj.bias",
              "self_attn.v_proj.weight"),
    "qwen3": ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "post_attention_layernorm.weight", "self_attn.k_norm.weight", "self_attn.k_proj.weight",
              "self_attn.q_norm.weight", "self_attn.q_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight"),
}
DENSE_LAYER_TENSORS["mistral"] = DENSE_LAYER_TENSORS["llama"]
_ZERO_IF_MISSING = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")  # Qwen MoE's biases
HEAD, EMBEDDINGS = "lm_head.weight", "model.embed_tokens.weight"


def _named(name: str) -> list[Architecture]:
    return [a for a in ARCHITECTURES if a.name.lower().startswith(name.lower())]


def select_architecture(cfg: MoEConfig, model_types: dict[str, str]) -> Architecture:
    """The output architecture (mergekit's choice): among those the config names (all by default), the ones that
    take its models; Mixtral where it is one, else the first."""
    candidates = _named(cfg.architecture) if cfg.architecture else list(ARCHITECTURES)
    reasons = {a.name: a.problem(cfg, model_types) for a in candidates}
    fitting = [a for a in candidates if reasons[a.name] is None]
    if not fitting:
        raise ConfigError([f"no output architecture takes these models: {'; '.join(reasons.values())}"], "experts")
    if len(fitting) > 1 and fitting[0].name != "Mixtral":
        log.warning("output architectures %s all take these models; writing %s (set architecture: to choose)",
                    ", ".join(a.name for a in fitting), fitting[0].name)
    return fitting[0]


# ------------------------------------------------------------------------------------------------------ plan

@dataclass
class Part:
    """One source of an output tensor: a model's tensor (with the expert whose noise and scale apply to it), or a
    given value (router weights, Qwen MoE's zero attention biases)."""

    ckpt: Checkpoint | None
    name: str
    expert: Expert | None = None
    residual: bool = False  # a down projection: the expert's residual_scale applies
    value: torch.Tensor | None = None


@dataclass
class OutTensor:
    name: str
    parts: list[Part]  # concatenated in order (stacked experts: e0's gate, e0's up, e1's gate, ...)
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Unit:
    """Output tensors read and written together, and the order (tensor, part) their noise is drawn in: a layer's
    fused experts draw it expert by expert across both of their tensors, as mergekit does."""

    tensors: list[OutTensor]
    draws: list[tuple[int, int]]

    @property
    def bytes_in(self) -> int:
        return sum(p.ckpt.tensors[p.name].nbytes for t in self.tensors for p in t.parts if p.ckpt is not None)


@dataclass
class MoEPlan:
    config: MoEConfig
    architecture: Architecture
    models: dict[str, Checkpoint]
    model_config: Any  # the base's transformers config
    units: list[Unit]
    out_dtype: torch.dtype | None
    layers: int

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(t.name, t.dtype, t.shape) for u in self.units for t in u.tensors]


def open_moe_models(cfg: MoEConfig, hub_cache: str | None = None, lora_merge_dtype: torch.dtype | None = None
                    ) -> dict[str, Checkpoint]:
    """Every model's headers (the Hub cache's snapshot for Hub ids); every unreadable one named in one ConfigError."""
    models, problems = {}, []
    for ref in cfg.models():
        try:
            models[ref] = open_model(local_reference(ref, hub_cache), lora_merge_dtype)
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        for ckpt in models.values():
            ckpt.close()
        raise ConfigError(problems, "inputs")
    return models


def plan_moe(cfg: MoEConfig, models: dict[str, Checkpoint]) -> MoEPlan:
    """Every output tensor from its sources, checked: each source present, the experts' projections the base's
    shapes (so they stack), every problem listed in one ConfigError."""
    transformers = require("transformers", "hf", "merge-engine moe")
    model_types = {ref: str(models[ref].config.get("model_type")) for ref in cfg.models()}
    arch = select_architecture(cfg, model_types)
    base = models[cfg.base_model]
    model_config = _base_config(transformers, base)
    if base.config.get("tie_word_embeddings") is False:  # BASE+ADAPTER whose adapter has a head of its own
        model_config.tie_word_embeddings = False
    layers = model_config.num_hidden_layers
    out_dtype = cfg.dtype or _config_dtype(model_config)
    template = DENSE_LAYER_TENSORS[arch.template or model_types[cfg.base_model]]
    problems: list[str] = []
    tied = getattr(model_config, "tie_word_embeddings", True)  # (the output's config.json keeps the base's)
    dense = _dense_tensors(cfg, arch, base, template, layers, tied, out_dtype, problems)
    _warn_left_out(base, arch, {t.name for t in dense})
    units = [Unit([t], []) for t in dense]
    for layer in range(layers):
        units += _expert_units(cfg, arch, models, template, layer, out_dtype, problems)
    problems += _mlp_size_problems(units, model_config)
    if problems:
        raise ConfigError(problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else []),
                          "inputs")
    _number_draws(units)
    return MoEPlan(cfg, arch, models, model_config, units, out_dtype, layers)


def _base_config(transformers, base: Checkpoint):
    try:
        return transformers.AutoConfig.from_pretrained(base.path, local_files_only=True, trust_remote_code=False)
    except transformers_config_errors() as e:
        raise CheckpointError(f"{base.path}: cannot read its config.json as a transformers config ({one_line(e)})"
                              ) from e


def _config_dtype(model_config) -> torch.dtype | None:
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _dense_tensors(cfg: MoEConfig, arch: Architecture, base: Checkpoint, template: tuple[str, ...], layers: int,
                   tied: bool, out_dtype: torch.dtype | None, problems: list[str]) -> list[OutTensor]:
    """The base's tensors outside the MLPs: its embeddings, each layer's attention and norms, final norm and head
    (the head only where the base has one or its config does not tie it: a tied head stays tied)."""
    names = [EMBEDDINGS] + [f"model.layers.{i}.{t}" for i in range(layers) for t in template if ".mlp." not in f".{t}"]
    names += ["model.norm.weight"] + ([HEAD] if HEAD in base.tensors or not tied else [])
    out = []
    for name in names:
        if name in base.tensors:
            info = base.tensors[name]
            out.append(OutTensor(name, [Part(base, name)], tuple(info.shape), out_dtype or info.dtype))
        elif name.endswith(_ZERO_IF_MISSING) and arch.template == "qwen2":
            out.append(_zero_bias(name, base, out_dtype))
        else:
            problems.append(f"{base.path}: the base model lacks tensor '{name}', which a {arch.name} output keeps")
    return out


def _warn_left_out(base: Checkpoint, arch: Architecture, kept: set[str]) -> None:
    """A warning naming the base's tensors that the output has no place for (a Llama base's attention or MLP biases
    in a Mixtral output; its MLP weights are the experts'): left out, as mergekit leaves them, so the output no
    longer computes them."""
    projections = tuple(f".mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
    left = [n for n in base.tensors if n not in kept and not n.endswith((*projections, "rotary_emb.inv_freq"))]
    if left:
        log.warning("%s: %d of the base's tensors have no place in a %s output and are left out (%s%s)", base.path,
                    len(left), arch.name, ", ".join(f"'{n}'" for n in left[:3]), ", ..." if len(left) > 3 else "")


def _zero_bias(name: str, base: Checkpoint, out_dtype: torch.dtype | None) -> OutTensor:
    """Qwen MoE's attention has biases; a Llama or Mistral base has none: zeros (mergekit's choice), one per row of
    the projection (mergekit counts hidden_size / heads per head: too few where the base's head_dim differs)."""
    weight = base.tensors.get(name.removesuffix("bias") + "weight")  # (a missing one is named with the rest)
    value = torch.zeros(weight.shape[0] if weight is not None else 0, dtype=out_dtype or torch.float32)
    return OutTensor(name, [Part(None, name, value=value)], tuple(value.shape), value.dtype)


def _expert_units(cfg: MoEConfig, arch: Architecture, models: dict[str, Checkpoint], template: tuple[str, ...],
                  layer: int, out_dtype: torch.dtype | None, problems: list[str]) -> list[Unit]:
    prefix = f"model.layers.{layer}.mlp."
    if arch.fused:
        return [_fused_unit(cfg, arch, models, prefix, out_dtype, problems)]
    units = []
    for t in (t for t in template if t.startswith("mlp.")):
        projection = t.removeprefix("mlp.")
        owners = [(e, f"{prefix}experts.{k}.{projection}") for k, e in enumerate(cfg.experts)]
        owners += [(e, prefix.replace(".mlp.", arch.shared_infix) + projection) for e in cfg.shared_experts]
        for expert, out_name in owners:
            part = _expert_part(models, expert, prefix + projection, problems)
            if part is not None:
                info = part.ckpt.tensors[part.name]
                units.append(Unit([OutTensor(out_name, [part], tuple(info.shape), out_dtype or info.dtype)], []))
    return units


def _expert_part(models: dict[str, Checkpoint], expert: Expert, name: str, problems: list[str]) -> Part | None:
    ckpt = models[expert.model]
    if name not in ckpt.tensors:
        problems.append(f"{ckpt.path}: expert model lacks tensor '{name}'")
        return None
    return Part(ckpt, name, expert, residual=name.endswith("down_proj.weight"))


def _mlp_size_problems(units: list[Unit], model_config) -> list[str]:
    """Each expert's projections against the sizes the output's config.json takes from the base's: experts that
    stack with each other but not with those sizes (or one expert per tensor, which nothing stacks) would not load."""
    hidden, inner = getattr(model_config, "hidden_size", None), getattr(model_config, "intermediate_size", None)
    if not (isinstance(hidden, int) and isinstance(inner, int)):
        return []
    want = {"gate_proj.weight": [inner, hidden], "up_proj.weight": [inner, hidden], "down_proj.weight": [hidden, inner]}
    problems = []
    for part in (p for unit in units for t in unit.tensors for p in t.parts if p.expert is not None):
        shape, expected = list(part.ckpt.tensors[part.name].shape), want[part.name.rsplit(".mlp.", 1)[1]]
        if shape != expected:
            problems.append(f"{part.ckpt.path}: tensor '{part.name}' is {shape} but the base's config.json (hidden_size "
                            f"{hidden}, intermediate_size {inner}) makes it {expected}: an expert's MLP must have the "
                            "base's sizes")
    return problems


def _fused_unit(cfg: MoEConfig, arch: Architecture, models: dict[str, Checkpoint], prefix: str,
                out_dtype: torch.dtype | None, problems: list[str]) -> Unit:
    """A layer's experts fused as transformers 5 holds them: experts.gate_up_proj [E, 2I, H] (each expert's gate
    rows then its up rows) and experts.down_proj [E, H, I]; noise drawn expert by expert in arch.fused's order."""
    gate_up: list[Part | None] = []
    down: list[Part | None] = []
    draws = []
    for k, expert in enumerate(cfg.experts):
        gate_up += [_expert_part(models, expert, prefix + p, problems) for p in ("gate_proj.weight", "up_proj.weight")]
        down.append(_expert_part(models, expert, prefix + "down_proj.weight", problems))
        for projection in map(_SOURCE_PROJECTION.get, arch.fused, arch.fused):
            draws.append((1, k) if projection == "down_proj" else (0, 2 * k + (projection == "up_proj")))
    if None in gate_up or None in down:
        return Unit([], [])
    tensors = [_stacked(f"{prefix}experts.{name}", parts, len(cfg.experts), out_dtype, problems)
               for name, parts in (("gate_up_proj", gate_up), ("down_proj", down))]
    return Unit(tensors, draws) if None not in tensors else Unit([], [])


def _stacked(name: str, parts: list[Part], experts: int, out_dtype: torch.dtype | None,
             problems: list[str]) -> OutTensor | None:
    """The stack of every expert's parts, which must have the first expert's shapes and one dtype."""
    infos = [p.ckpt.tensors[p.name] for p in parts]
    per_expert = len(parts) // experts
    for k, (part, info) in enumerate(zip(parts, infos)):
        like = infos[k % per_expert]
        if info.shape != like.shape or len(info.shape) != 2 or info.shape[1:] != infos[0].shape[1:]:
            problems.append(f"{part.ckpt.path}: tensor '{part.name}' is {list(info.shape)} but the first expert's "
                            f"is {list(like.shape)}: the experts do not stack into '{name}'")
            return None
    dtypes = {info.dtype for info in infos}
    dtype = out_dtype or _promoted(dtypes)
    rows = sum(info.shape[0] for info in infos[:per_expert])
    return OutTensor(name, parts, (experts, rows, *infos[0].shape[1:]), dtype)


def _promoted(dtypes: set[torch.dtype]) -> torch.dtype:
    result = dtypes.pop()
    for d in dtypes:
        result = torch.promote_types(result, d)
    return result


def _number_draws(units: list[Unit]) -> None:
    """A unit without an explicit draw order draws in its tensors' part order."""
    for unit in units:
        if not unit.draws:
            unit.draws = [(t, p) for t, tensor in enumerate(unit.tensors) for p in range(len(tensor.parts))]


# ----------------------------------------------------------------------------------------------------- gates

def load_prompt_tokenizer(base_path: str):
    """The base's tokenizer as mergekit's moe prepares it: left padding, padding with BOS (EOS when it has none)."""
    transformers = require("transformers", "hf", "merge-engine moe")
    try:
        tokenizer = load_tokenizer(transformers, base_path)
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
        raise CheckpointError(f"{base_path}: cannot load the base model's tokenizer ({one_line(e)})") from e
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(tokenizer, prompts: tuple[str, ...]):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def gate_vectors(plan: MoEPlan, tokenizer, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[layers, gated experts, hidden]: each gated expert's gate vector in every layer (mergekit's gate modes)."""
    cfg, mc = plan.config, plan.model_config
    shape = (plan.layers, len(cfg.gated()), mc.hidden_size)
    if cfg.gate_mode == "random":
        return torch.randn(shape, generator=generator)
    if cfg.gate_mode == "uniform_random":  # torch.nn.Linear's default initialisation
        scale = math.sqrt(1.0 / mc.hidden_size)
        return torch.rand(shape, generator=generator) * 2 * scale - scale
    represent = (_embedding_representation(plan) if cfg.gate_mode == "cheap_embed"
                 else _hidden_representation(plan, device))
    names = [f"experts[{i}]" for i in range(len(cfg.experts))] + [f"shared_experts[{i}]"
                                                                 for i in range(len(cfg.shared_experts))]
    vectors = []
    for where, expert in zip(names, cfg.gated()):
        v = represent(_checked_tokens(plan, tokenizer, expert.positive_prompts, f"{where}.positive_prompts"))
        if expert.negative_prompts:
            v -= represent(_checked_tokens(plan, tokenizer, expert.negative_prompts, f"{where}.negative_prompts"))
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vectors.append(v)
    return torch.stack(vectors, dim=1).cpu()


def _checked_tokens(plan: MoEPlan, tokenizer, prompts: tuple[str, ...], where: str):
    """The prompts tokenized, checked: each token id a row of the base's embeddings, and (where the base runs on
    them) some token to run: a prompt of no tokens, from a tokenizer without BOS, is an empty batch."""
    tokens = tokenize_prompts(tokenizer, prompts)
    ids = tokens["input_ids"]
    if ids.numel() == 0 and plan.config.gate_mode != "cheap_embed":  # (cheap_embed sums no rows, as mergekit)
        raise MergeEngineError(f"{where}: {list(prompts)} tokenize to no tokens (the base's tokenizer adds no BOS), "
                               f"and gate_mode {plan.config.gate_mode} runs the base model on them: give some text")
    base = plan.models[plan.config.base_model]
    rows = base.tensors[EMBEDDINGS].shape[0]
    if ids.numel() and int(ids.max()) >= rows:
        raise MergeEngineError(f"{where}: the tokenizer of {base.path} gives token id {int(ids.max())} but its "
                               f"'{EMBEDDINGS}' has {rows} rows (is the tokenizer the model's own?)")
    return tokens


def _embedding_representation(plan: MoEPlan):
    """cheap_embed: the prompts' token embeddings summed, normalised, the same in every layer. (mergekit multiplies
    one-hot rows by the embedding matrix; indexing it gives the same numbers without the [tokens, vocabulary]
    matrix.)"""
    base = plan.models[plan.config.base_model]
    embeddings = base.read(EMBEDDINGS).float()

    def represent(tokens) -> torch.Tensor:
        summed = (embeddings[tokens["input_ids"]] * tokens["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(plan.layers, 1)
    return represent


def _hidden_representation(plan: MoEPlan, device: torch.device):
    """hidden (the last token's) or hidden_avg (the mean over positions, padding included, as mergekit): the base
    model's hidden state entering each layer, averaged over the prompts, computed in bf16 as mergekit does."""
    from merge_engine.stats.models import load_model
    base = plan.models[plan.config.base_model]
    if len(base.folders) > 1:
        raise MergeEngineError(f"{plan.config.base_model}: gate_mode {plan.config.gate_mode} runs the base model, "
                               "which must be one folder, not BASE+ADAPTER (merge the adapter in first)")
    model = load_model(base.path, torch.bfloat16, device).eval()
    average = plan.config.gate_mode == "hidden_avg"

    def represent(tokens) -> torch.Tensor:
        with torch.no_grad():
            out = model(**tokens.to(device), output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states[:-1])  # [layers, prompts, positions, hidden]
        states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
        return states.sum(dim=1) / states.shape[1]
    return represent


def warn_degenerate_gates(vectors: torch.Tensor, threshold: float = 5.0) -> None:
    """A warning naming the layers whose gate vectors are nearly dependent (condition number above threshold):
    their router cannot tell some experts apart. Rows all zero (cheap_embed prompts of no tokens) have no condition
    number (NaN), and SVD fails on non-finite rows: both count as degenerate."""
    def degenerate(layer: torch.Tensor) -> bool:
        layer = layer.float()
        return not (torch.isfinite(layer).all() and torch.linalg.cond(layer) <= threshold)
    bad = [i for i in range(vectors.shape[0]) if degenerate(vectors[i])]
    if bad:
        where = "every layer" if len(bad) == vectors.shape[0] else f"layer(s) {', '.join(map(str, bad))}"
        log.warning("the gate vectors of %s are nearly dependent (condition number above %g): the prompts may be "
                    "too similar, and some experts will be under-used", where, threshold)


def add_routers(plan: MoEPlan, vectors: torch.Tensor) -> None:
    """The routers as output tensors: mlp.gate [experts, hidden] per layer, and Qwen MoE's shared_expert_gate
    [1, hidden]."""
    routed = len(plan.config.experts)
    dtype = plan.out_dtype or vectors.dtype
    for layer in range(plan.layers):
        gates = [("mlp.gate.weight", vectors[layer, :routed])]
        if plan.architecture.shared == "gated":
            gates.append(("mlp.shared_expert_gate.weight", vectors[layer, routed:]))
        for name, value in gates:
            value = value.to(dtype).contiguous()
            full = f"model.layers.{layer}.{name}"
            plan.units.append(Unit([OutTensor(full, [Part(None, full, value=value)], tuple(value.shape), dtype)],
                                   [(0, 0)]))


# ------------------------------------------------------------------------------------------------ the output

def output_model_config(plan: MoEPlan) -> str:
    """config.json of the output, as mergekit-moe writes it for the architecture."""
    transformers = require("transformers", "hf", "merge-engine moe")
    base, cfg, arch = plan.model_config, plan.config, plan.architecture
    experts = len(cfg.experts)
    if arch.model_type == "deepseek":  # a remote-code model: a plain dict, as mergekit writes it
        import json
        out = base.to_dict()
        out.update(architectures=["DeepseekForCausalLM"], model_type="deepseek", n_routed_experts=experts,
                   n_shared_experts=len(cfg.shared_experts) or None, num_experts_per_tok=cfg.experts_per_token,
                   first_k_dense_replace=0, moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=True,
                   moe_intermediate_size=out["intermediate_size"], auto_map=DEEPSEEK_AUTO_MAP)
        if plan.out_dtype is not None:
            out["torch_dtype"] = str(plan.out_dtype).removeprefix("torch.")
        return json.dumps(out, indent=4)
    if arch.model_type == "mixtral":
        if not isinstance(base, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base.max_position_embeddings
            base = mistral
        out = transformers.MixtralConfig(**base.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = experts
        out.sliding_window = None
    else:
        config_class = transformers.Qwen2MoeConfig if arch.model_type == "qwen2_moe" else transformers.Qwen3MoeConfig
        out = config_class(**base.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM" if arch.model_type == "qwen2_moe" else "Qwen3MoeForCausalLM"]
        out.num_experts = experts
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.moe_intermediate_size = out.intermediate_size
        if arch.model_type == "qwen2_moe":
            out.sliding_window = None
            out.use_sliding_window = False
            out.shared_expert_intermediate_size = out.intermediate_size
    out.num_experts_per_tok = cfg.experts_per_token
    if plan.out_dtype is not None or arch.model_type == "mixtral":
        out.dtype = plan.out_dtype
    if experts & (experts - 1):
        log.warning("%d experts, not a power of two: llama.cpp cannot run this model", experts)
    return out.to_json_string(use_diff=True)


DEEPSEEK_AUTO_MAP = {
    "AutoConfig": "deepseek-ai/deepseek-moe-16b-base--configuration_deepseek.DeepseekConfig",
    "AutoModel": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekForCausalLM",
}


def unit_tensors(unit: Unit, sources: list[list[torch.Tensor]], generator: torch.Generator, pool: BufferPool
                 ) -> list[tuple[str, torch.Tensor]]:
    """A unit's output tensors from its sources as read: noise and residual scale applied part by part in the
    unit's draw order, in place in the stored dtype (the bits of mergekit's `tensor + noise`, `tensor * scale`), then
    each output's parts cast into their places in one pooled buffer (a single part already in the output dtype is
    written as read)."""
    for t, p in unit.draws:
        part, x = unit.tensors[t].parts[p], sources[t][p]
        if part.expert is not None and part.expert.noise_scale is not None:
            x.add_(torch.randn(x.shape, dtype=x.dtype, generator=generator) * part.expert.noise_scale)
        if part.residual and part.expert.residual_scale is not None:
            x.mul_(part.expert.residual_scale)
    out = []
    for tensor, parts in zip(unit.tensors, sources):
        if len(parts) == 1 and parts[0].dtype == tensor.dtype:
            out.append((tensor.name, parts[0].view(tensor.shape)))
            continue
        result, at = pool.take(tensor.shape, tensor.dtype), 0
        flat = result.view(-1)
        for x in parts:
            flat[at:at + x.numel()].copy_(x.reshape(-1))
            at += x.numel()
        out.append((tensor.name, result))
    return out


def _read_unit(unit: Unit, direct_io: str, pool: BufferPool) -> list[list[torch.Tensor]]:
    """Each part of each tensor of a unit, read into pooled buffers (a given value copied: it is changed in place)."""
    return [[p.value.clone() if p.ckpt is None else p.ckpt.read_pooled(p.name, pool.take_bytes, direct_io)
             for p in t.parts] for t in unit.tensors]


@dataclass
class MoEReport:
    architecture: str
    experts: int
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    out_dir: str

    def summary(self) -> str:
        gbps = (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9) / 1e9
        return (f"built a {self.architecture} model of {self.experts} experts: {self.tensors} tensors, read "
                f"{self.bytes_read / 1e9:.3f} GB, wrote {self.bytes_written / 1e9:.3f} GB in {self.seconds:.2f} s "
                f"({gbps:.2f} GB/s) -> {self.out_dir}")


def build_moe(config: MoEConfig | dict | str | os.PathLike, out_dir: str | os.PathLike, options=None,
              allow_all_same: bool = False) -> MoEReport:
    """Build the MoE a mergekit-moe config describes (a parsed MoEConfig, a mapping or a YAML path) into out_dir.
    options: a MergeOptions (device, out_shard_size, random_seed, copy_tokenizer, write_model_card, overwrite,
    direct_io, quiet, hub_cache, lora_merge_dtype apply). allow_all_same: mergekit's
    --i-understand-this-is-not-useful-without-training."""
    started = time.perf_counter()
    require("transformers", "hf", "merge-engine moe")  # (its configs, tokenizer and gate models)
    options = given_options(options)
    out_dir = os.fspath(out_dir)
    cfg = _as_config(config, allow_all_same)
    device = check_options(out_dir, options)
    if isinstance(config, (str, os.PathLike)):  # --overwrite would delete a config kept in the output folder
        check_output_apart(out_dir, [os.fspath(config)])
    if options.expert_layout != "fused":  # (Mixtral and Qwen3 MoE experts are written fused, as mergekit-moe's)
        raise MergeEngineError(f"--expert-layout {options.expert_layout} is not supported by merge-engine moe: it "
                               "writes experts as mergekit-moe does (leave --expert-layout out)")
    models = open_moe_models(cfg, cache_folder(options.hub_cache), options.lora_merge_dtype)
    try:
        check_output_apart(out_dir, [ckpt.path for ckpt in models.values()] + [f for c in models.values()
                                                                              for f in c.folders])
        plan = plan_moe(cfg, models)
        base = models[cfg.base_model]
        needs_tokenizer = cfg.gate_mode not in RANDOM_GATE_MODES
        tokenizer = _tokenizer(base.path, needs_tokenizer, options.copy_tokenizer)
        generator = torch.Generator().manual_seed(options.random_seed)
        vectors = gate_vectors(plan, tokenizer, generator, device)
        warn_degenerate_gates(vectors)
        add_routers(plan, vectors)
        writer = ShardedWriter(out_dir, plan.entries(), options.out_shard_size, options.overwrite,
                               direct=options.direct_io != "off")
        with writer.completing():
            bytes_read = _copy(plan, writer, generator, options)
            for ckpt in models.values():
                ckpt.check_unchanged()
            _write_side_files(plan, writer, tokenizer, options)
    finally:
        for ckpt in models.values():
            ckpt.close()
    return MoEReport(plan.architecture.name, len(cfg.experts), len(plan.entries()), bytes_read, writer.bytes_written,
                     time.perf_counter() - started, writer.out_dir)


def _as_config(config, allow_all_same: bool) -> MoEConfig:
    if isinstance(config, MoEConfig):
        problems = routing_problems(config, allow_all_same)
        if problems:
            raise ConfigError(problems)
        return config
    if isinstance(config, dict):
        return parse_moe_config(config, allow_all_same=allow_all_same)
    if isinstance(config, (str, os.PathLike)):
        return load_moe_config(os.fspath(config), allow_all_same=allow_all_same)
    raise MergeEngineError(f"config must be a MoEConfig, a mapping or a YAML path, got {type(config).__name__}")


def _tokenizer(base_path: str, needed: bool, copied: bool):
    """The base's tokenizer where prompts are tokenized or it is copied (None where it is neither, or only copied
    and missing: a warning then)."""
    if not (needed or copied):
        return None
    try:
        return load_prompt_tokenizer(base_path)
    except CheckpointError:
        if needed:
            raise
        log.warning("%s: no tokenizer could be loaded: the output has none (--no-copy-tokenizer silences this)",
                    base_path)
        return None


def _copy(plan: MoEPlan, writer: ShardedWriter, generator: torch.Generator, options) -> int:
    """Every unit read (one ahead, in a thread), built in order (the noise is drawn in mergekit's order) and
    written (in a thread) while the next is read. Buffers are reused once a unit is on disk: fresh memory costs its
    page faults (io/buffers.py)."""
    units = plan.units
    pool = BufferPool(4 * max((_unit_bytes(u) for u in units), default=0))
    with ThreadPoolExecutor(1, thread_name_prefix="me-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="me-write") as write_pool, \
            progress_bar(total=sum(u.bytes_in for u in units), unit="B", unit_scale=True, desc="building",
                         disable=options.quiet) as bar:
        pending = reader.submit(_read_unit, units[0], options.direct_io, pool) if units else None
        written = None
        for i, unit in enumerate(units):
            sources = pending.result()
            if i + 1 < len(units):
                pending = reader.submit(_read_unit, units[i + 1], options.direct_io, pool)
            tensors = unit_tensors(unit, sources, generator, pool)
            if written is not None:
                written.result()
            written = write_pool.submit(_write_unit, writer, tensors, [x for parts in sources for x in parts], pool)
            bar.update(unit.bytes_in)
        if written is not None:
            written.result()
    return sum(u.bytes_in for u in units)


def _unit_bytes(unit: Unit) -> int:
    """A unit's buffers: its sources and its outputs."""
    return unit.bytes_in + sum(math.prod(t.shape) * t.dtype.itemsize for t in unit.tensors)


def _write_unit(writer: ShardedWriter, tensors: list[tuple[str, torch.Tensor]], sources: list[torch.Tensor],
                pool: BufferPool) -> None:
    for name, tensor in tensors:
        writer.write(name, tensor)
    pool.give(sources + [t for _, t in tensors])


def _write_side_files(plan: MoEPlan, writer: ShardedWriter, tokenizer, options) -> None:
    """config.json, the base's generation config, the tokenizer (re-saved with its padding, as mergekit's), and
    with write_model_card the config as mergekit_moe_config.yml (as mergekit-moe) and a README.md model card."""
    writer.add_file("config.json", output_model_config(plan))
    base = plan.models[plan.config.base_model]
    copy_if_present(base.path, "generation_config.json", writer)
    if tokenizer is not None and options.copy_tokenizer:
        with tempfile.TemporaryDirectory() as tmp:
            for f in save_tokenizer(tokenizer, None, tmp):
                writer.copy_file(os.path.join(tmp, f))
    if options.write_model_card:
        writer.add_file(CONFIG_COPY_NAME, plan.config.text)
        writer.add_file("README.md", moe_card(plan.config, plan.architecture.name))
