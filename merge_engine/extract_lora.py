"""A fine-tune's difference to its base as a PEFT LoRA adapter, as mergekit-extract-lora 0.1.5 extracts it
(`merge-engine extract-lora --model TUNED --base-model BASE --out-path OUT`).

The modules are the fine-tuned model's, as transformers builds it (on the meta device: no weights loaded): every
module with a weight is
- saved whole (`modules_to_save`) when it is an embedding or the output head (unless --embed-lora), or named by
  --save-module, or of a kind LoRA cannot hold (norms; unless --skip-undecomposable);
- else, where the --include-regex/--exclude-regex filters keep it, a Linear or Embedding weight's difference
  d = TUNED - BASE factored by SVD (in fp32): d = U S Vh, rank r = min(--max-rank, its singular values
  above --sv-epsilon), lora_A = sqrt(S_r) Vh_r and lora_B = U_r sqrt(S_r) (--distribute-scale, the default; else
  lora_A = S_r Vh_r, lora_B = U_r), in the weight's dtype; an Embedding's transposed, as peft's lora_embedding_A/B;
  a bias's difference as lora_B.bias, as mergekit stores it (peft loads no such tensor without lora_bias, which it
  cannot merge into the target layers that lack a bias: a fine-tune's bias changes are not carried). (mergekit
  factors Conv1d and Conv2d weights too, as batches of kernel matrices, into tensors peft cannot load: here they
  are saved whole, as norms are.)
adapter_config.json gives r and lora_alpha as the largest rank kept (scaling 1) and the others in rank_pattern and
alpha_pattern; README.md is a model card. merge_engine's `patch extract --storage lora` is the other LoRA extractor
here (linear weights only, lora_B = U_r S_r, --energy), made for its patch workflow.

Unlike mergekit, every tensor each module needs is checked (present in both models, shapes equal) before any is
read, a --save-module must name a module with a weight, a module of rank 0 (no singular value above --sv-epsilon,
a rank peft refuses) is left out of the adapter (exclude_modules), and the adapter is written to a temporary folder
moved into place when complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import torch
import yaml

from merge_engine.devices import resolve_device
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError
from merge_engine.extras import BUILDING_TRANSFORMERS_MODEL, require, transformers_config_errors
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.hub_cache import local_reference
from merge_engine.io.lora import open_model
from merge_engine.io.safetensors_format import save_tensors
from merge_engine.io.writer import ShardedWriter, check_output_apart
from merge_engine.plan import TIED_HEADS
from merge_engine.vocabulary import one_line

log = logging.getLogger("merge_engine")
_PREFIX = "base_model.model."


@dataclass
class ExtractOptions:
    max_rank: int = 128
    distribute_scale: bool = True
    embed_lora: bool = False  # embeddings as lora_embedding_A/B rather than whole in modules_to_save
    modules_to_save: list[str] = field(default_factory=list)  # module names (or their last component) kept whole
    exclude_regexes: list[str] = field(default_factory=list)
    include_regexes: list[str] = field(default_factory=list)
    sv_epsilon: float = 0.0  # singular values at or below it are dropped
    skip_undecomposable: bool = False  # modules LoRA cannot hold (norms) left out rather than kept whole
    device: str = "cpu"
    overwrite: bool = False
    hub_cache: str | None = None


@dataclass
class Module:
    name: str
    weight: str  # the tensor name in the checkpoints (a tied head: the embeddings it reads)
    bias: str | None
    kind: str  # "lora", "embedding" (lora_embedding_A/B) or "whole"


@dataclass
class ExtractReport:
    out_dir: str
    ranks: dict[str, int]  # module -> rank kept
    whole: list[str]  # modules saved whole

    def summary(self) -> str:
        top = max(self.ranks.values(), default=0)
        return (f"extracted a LoRA adapter of {len(self.ranks)} modules (rank up to {top}) and {len(self.whole)} "
                f"module(s) saved whole -> {self.out_dir}")


def extract_lora(model: str, base_model: str, out_dir: str, options: ExtractOptions | None = None) -> ExtractReport:
    """Write the PEFT LoRA adapter of model's difference to base_model into out_dir (module docstring)."""
    options = options or ExtractOptions()
    _check_options(options)
    transformers = require("transformers", "hf", "merge-engine extract-lora")
    tuned, base = (open_model(local_reference(ref, options.hub_cache)) for ref in (model, base_model))
    try:
        check_output_apart(out_dir, tuned.folders + base.folders)
        modules, to_save, vocab = plan_modules(transformers, tuned, base, options)
        device = resolve_device(options.device)
        with ShardedWriter(out_dir, [], layout=[], overwrite=options.overwrite).completing() as writer:
            tensors, ranks, dropped = _extract(modules, tuned, base, options, device)
            save_tensors(tensors, os.path.join(writer.tmp_dir, "adapter_model.safetensors"))
            config = adapter_config(base_model.partition("+")[0], ranks, to_save,  # (mergekit names the base's path)
                                    dropped)
            writer.add_file("adapter_config.json", json.dumps(config, indent=4))
            writer.add_file("README.md", _card(model, base_model, vocab))
    finally:
        tuned.close()
        base.close()
    return ExtractReport(writer.out_dir, ranks, [m.name for m in modules if m.kind == "whole"])


def _check_options(options: ExtractOptions) -> None:
    if type(options.max_rank) is not int or options.max_rank < 1:
        raise MergeEngineError(f"max_rank must be a whole number of at least 1, got {options.max_rank!r}")
    for pattern in options.exclude_regexes + options.include_regexes:
        try:
            re.compile(pattern)
        except re.error as e:
            raise MergeEngineError(f"{pattern!r} is not a regular expression ({e})") from e


def plan_modules(transformers, tuned: Checkpoint, base: Checkpoint, options: ExtractOptions
                 ) -> tuple[list[Module], list[str], dict[str, int | None]]:
    """What each module of the fine-tuned model becomes, modules_to_save (given ones, then those added) and the
    vocabulary sizes {"base": ..., "fine-tuned": ...}; ConfigError naming every tensor a module needs that a model
    lacks or whose shapes differ."""
    model = _meta_model(transformers, tuned)
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    nn = torch.nn
    vocab = _vocab_sizes(_module_name(model, embed_in), tuned, base)
    embed_lora = options.embed_lora and _vocabulary_agrees(vocab)
    if embed_lora and embed_out is not None and getattr(model.config, "tie_word_embeddings", False) \
            and not _matches(options.exclude_regexes, _module_name(model, embed_out)):
        log.warning("the head is tied to the embeddings: both are factored, and peft's merge_and_unload adds the "
                    "embeddings' update twice (once through each); to merge the adapter, extract with -e lm_head")
    to_save, modules, problems, warned = list(options.modules_to_save), [], [], set()
    for name, module in model.named_modules():
        if not name or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        last = name.split(".")[-1]
        is_embedding = module is embed_in or module is embed_out or isinstance(module, nn.Embedding)
        if is_embedding and not embed_lora and not _matches(options.exclude_regexes, name) and last not in to_save:
            log.info("%s: saved whole (an embedding; --embed-lora would factor it)", name)
            to_save.append(last)
        if name in to_save or last in to_save:
            kind = "whole"
        elif not _extracted(name, options):
            continue
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            kind = "embedding" if isinstance(module, nn.Embedding) else "lora"
        else:  # norms; and convolutions, which mergekit factors as batches of kernels, a shape peft cannot load
            if last not in warned:  # (once per name, not per layer)
                log.warning("%s: a %s, which LoRA cannot hold: %s", last, type(module).__name__,
                            "left out (--skip-undecomposable)" if options.skip_undecomposable else
                            "saved whole (modules_to_save)")
                warned.add(last)
            if options.skip_undecomposable:
                continue
            to_save += [last] if last not in to_save else []
            kind = "whole"
        modules.append(_module(name, kind, module, tuned, base, problems))
    problems += [f"--save-module '{s}': no module of {tuned.path} with a weight has that name or last name component "
                 "(a module holding others, such as 'mlp', cannot be saved whole: name the modules it holds)"
                 for s in options.modules_to_save if not any(s in (m.name, m.name.split(".")[-1]) for m in modules)]
    if problems:
        raise ConfigError(problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else []),
                          "inputs")
    if not any(m.kind != "whole" for m in modules):
        raise ConfigError(["no module is left to factor (every one is saved whole or filtered out)"], "inputs")
    return modules, to_save, vocab


def _meta_model(transformers, ckpt: Checkpoint):
    """The model as transformers builds it from config.json, on the meta device (its modules, no weights)."""
    architecture = (ckpt.config.get("architectures") or [""])[0]
    kind = next((k for k in ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
                 if architecture.endswith(k)), "ForCausalLM")
    try:
        config = transformers.AutoConfig.from_pretrained(ckpt.path, local_files_only=True, trust_remote_code=False)
        with BUILDING_TRANSFORMERS_MODEL, torch.device("meta"):
            return getattr(transformers, f"AutoModel{kind}").from_config(config)
    except transformers_config_errors() as e:
        raise CheckpointError(f"{ckpt.path}: cannot build its model from config.json ({one_line(e)})") from e


def _vocab_sizes(embed_name: str, tuned: Checkpoint, base: Checkpoint) -> dict[str, int | None]:
    """Each model's vocabulary: its input embeddings' rows (config.json's vocab_size where they are missing, the
    module check then naming them; a base needs no config.json, only its tensors are read)."""
    weight = f"{embed_name}.weight"
    return {role: ckpt.tensors[weight].shape[0] if weight in ckpt.tensors else ckpt.config.get("vocab_size")
            for role, ckpt in (("base", base), ("fine-tuned", tuned))}


def _module_name(model, module) -> str:
    return next((name for name, m in model.named_modules() if m is module), "")


def _vocabulary_agrees(vocab: dict[str, int | None]) -> bool:
    if len(set(vocab.values())) > 1:
        log.warning("the vocabularies differ (%s): the embeddings are saved whole, not factored", vocab)
        return False
    return True


def _matches(patterns: list[str], name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def _extracted(name: str, options: ExtractOptions) -> bool:
    if options.include_regexes and not _matches(options.include_regexes, name):
        return False
    return not _matches(options.exclude_regexes, name)


def _module(name: str, kind: str, module, tuned: Checkpoint, base: Checkpoint, problems: list[str]) -> Module:
    """The module's tensors, checked: present (a head tied to the embeddings reads them), the same shape in both
    models where they are factored."""
    weight = _present(f"{name}.weight", tuned)
    bias = f"{name}.bias" if getattr(module, "bias", None) is not None and f"{name}.bias" in tuned.tensors else None
    needed = [(tuned, weight)] + ([(base, weight)] + ([(base, bias)] if bias else []) if kind != "whole" else [])
    for ckpt, tensor in needed:
        if tensor not in ckpt.tensors:
            problems.append(f"{ckpt.path}: tensor '{tensor}' is missing (module '{name}')")
    if kind != "whole" and weight in base.tensors and weight in tuned.tensors:
        shapes = [tuple(c.tensors[weight].shape) for c in (tuned, base)]
        if shapes[0] != shapes[1]:
            problems.append(f"tensor '{weight}' is {list(shapes[0])} in {tuned.path} but {list(shapes[1])} in "
                            f"{base.path}: its difference cannot be taken")
    return Module(name, weight, bias, kind)


def _present(name: str, ckpt: Checkpoint) -> str:
    """name, or for a head tied to the embeddings (absent from the checkpoint) the embeddings it reads."""
    return next((t for t in (name, *TIED_HEADS.get(name, ())) if t in ckpt.tensors), name)


def _extract(modules: list[Module], tuned: Checkpoint, base: Checkpoint, options: ExtractOptions,
             device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
    """The adapter's tensors, each factored module's rank, and the modules left out: those with no singular value
    above --sv-epsilon (rank 0, which peft refuses; mergekit writes them anyway)."""
    tensors, ranks, dropped = {}, {}, []
    for m in modules:
        if m.kind == "whole":
            tensors[f"{_PREFIX}{m.name}.weight"] = tuned.read(m.weight)
            if m.bias:
                tensors[f"{_PREFIX}{m.name}.bias"] = tuned.read(m.bias)
            continue
        a, b = factor(tuned.read(m.weight).to(device) - base.read(m.weight).to(device), options,
                      transpose=m.kind == "embedding")
        if a.shape[0] == 0:
            log.info("%s: no singular value above --sv-epsilon: left out", m.name)
            dropped.append(m.name)
            continue
        names = ("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding" else ("lora_A.weight",
                                                                                        "lora_B.weight")
        tensors[f"{_PREFIX}{m.name}.{names[0]}"], tensors[f"{_PREFIX}{m.name}.{names[1]}"] = a.cpu(), b.cpu()
        ranks[m.name] = a.shape[0]
        if m.bias:
            tensors[f"{_PREFIX}{m.name}.lora_B.bias"] = tuned.read(m.bias) - base.read(m.bias)
    if not ranks:
        raise ConfigError([f"no module's difference has a singular value above --sv-epsilon {options.sv_epsilon}: "
                           "there is nothing to adapt (lower --sv-epsilon)"], "inputs")
    return tensors, ranks, dropped


def factor(d: torch.Tensor, options: ExtractOptions, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of a weight difference, in its dtype (the module docstring's rule)."""
    out_dtype = d.dtype
    u, s, vh = torch.linalg.svd((d.T if transpose else d).to(torch.float32), full_matrices=False)
    rank = min(options.max_rank, s.shape[0])
    if options.sv_epsilon > 0:
        rank = min(int((s > options.sv_epsilon).sum()), rank)
    if options.distribute_scale:
        scale_a = scale_b = torch.diag(torch.sqrt(s[:rank]))
    else:
        scale_a, scale_b = torch.diag(s[:rank]), torch.eye(rank, device=s.device)
    return (scale_a @ vh[:rank]).to(out_dtype), (u[:, :rank] @ scale_b).to(out_dtype)


def adapter_config(base_model: str, ranks: dict[str, int], to_save: list[str], dropped: list[str] = ()) -> dict:
    """mergekit-extract-lora's adapter_config.json. (No lora_bias: peft cannot merge it into the target layers that
    have no bias, so peft drops the stored lora_B.bias tensors, as it does mergekit's.) Modules left out at rank 0
    whose last name component is a target are named in exclude_modules, so that peft adds no LoRA to them."""
    top = max(ranks.values())
    other = {m: r for m, r in ranks.items() if r != top}
    targets = sorted({m.split(".")[-1] for m in ranks})
    excluded = [m for m in dropped if m.split(".")[-1] in targets]
    return {"base_model_name_or_path": base_model, "peft_type": "LORA", "use_rslora": False,
            "target_modules": targets, "modules_to_save": to_save,
            "task_type": "CAUSAL_LM", "r": top, "lora_alpha": top, "rank_pattern": other, "alpha_pattern": dict(other),
            "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
            **({"exclude_modules": excluded} if excluded else {})}


def _card(model: str, base_model: str, vocab: dict[str, int | None]) -> str:
    warning = ("\n\n> [!WARNING]\n> The vocabulary sizes differ (base "
               f"{vocab['base']}, fine-tuned {vocab['fine-tuned']}): call "
               f"`model.resize_token_embeddings({vocab['fine-tuned']})` before loading this adapter."
               if len(set(vocab.values())) > 1 else "")
    metadata = yaml.safe_dump({"tags": ["merge_engine", "peft"], "library_name": "peft"}, sort_keys=False)
    return (f"---\n{metadata}---\n# A LoRA adapter extracted from {model}\n\nThis LoRA adapter was extracted from "
            f"{model} with {base_model} as its base, by merge_engine (`merge-engine extract-lora`).{warning}\n")
