"""Vocabulary alignment (`tokenizer_source:` / `tokenizer:`), with mergekit 0.1.5's semantics
(mergekit/tokenizer/build.py and embed.py) and a deterministic token order.

    build_vocabulary(spec, models, base)     plan time, from tokenizer files: the output tokenizer, and
                                             where each output token sits in each input
    Vocabulary.recipe(models, base, ...)     plan time, per group of inputs: every check, and which row
                                             each output row takes
    align_rows(recipe, tensors)              compute time, per vocabulary-indexed tensor (embeddings,
                                             LM heads): the inputs in the output's token order

Each output row of an input is its own row for the token where it has the token (and no `force`),
otherwise the token's default: the row of the only input that has it, else the base's, else the mean
of the inputs that have it, else zeros; or what `tokenizer.tokens` names. Rows padded on by
`pad_to_multiple_of` hold the mean of the token rows.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_engine.config import TokenizerSpec, TokenSetting
from merge_engine.errors import ConfigError
from merge_engine.extras import require
from merge_engine.io.untrusted import inside_folder

log = logging.getLogger("merge_engine")
TOKENIZER_SETTINGS = "a merge that sets tokenizer_source, tokenizer or chat_template"  # what needs transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def load_tokenizer(transformers, folder: str):
    """The tokenizer saved in a local folder. Never the hub: transformers would take a name that is not a folder
    for a repository id and download it. Never code the folder ships (`auto_map`): transformers would ask on a
    terminal whether to run it, and import it."""
    return transformers.AutoTokenizer.from_pretrained(tokenizer_folder(folder), use_fast=True, local_files_only=True,
                                                      trust_remote_code=False)


def one_line(e: Exception) -> str:
    """An exception as one line (transformers' messages span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def tokenizer_folder(folder: str) -> str:
    """folder, once every tokenizer file in it is known to lie inside it (transformers follows symlinks)."""
    for name in TOKENIZER_FILES:
        if os.path.lexists(os.path.join(folder, name)):
            inside_folder(folder, name, folder)
    return folder


@dataclass
class RowRecipe:
    """Which row each output row of each input takes, for one group of inputs (models, base)."""

    rows: int  # output rows (tokens, then padding)
    tokens: int
    own: torch.Tensor  # int64 [inputs, tokens]: the input's own row, -1 where it takes the default
    default_ids: torch.Tensor  # int64 [D]: tokens whose default some input takes
    copies: list[tuple[int, torch.Tensor, torch.Tensor]]  # (input, positions in default_ids, its rows)
    average_pos: torch.Tensor  # int64 [A]: positions in default_ids that average the inputs having them
    average_rows: torch.Tensor  # int64 [inputs, A]: each input's row of those tokens, -1 where absent
    identity: bool = False  # every input's rows are already the output's (same tokens, no defaults)
    _on: dict[torch.device, RowRecipe] = field(default_factory=dict, repr=False)

    def to(self, device: torch.device) -> RowRecipe:
        if device.type == "cpu":
            return self
        if device not in self._on:
            self._on[device] = RowRecipe(
                self.rows, self.tokens, self.own.to(device), self.default_ids.to(device),
                [(i, pos.to(device), rows.to(device)) for i, pos, rows in self.copies],
                self.average_pos.to(device), self.average_rows.to(device))
        return self._on[device]


def truncated_rows(inputs: int, rows: int) -> RowRecipe:
    """Every input's first `rows` rows, as they are (mergekit's --unsafe-truncate-embeddings)."""
    none = torch.empty(0, dtype=torch.int64)
    return RowRecipe(rows, rows, torch.arange(rows).expand(inputs, rows), none, [], none,
                     torch.empty((inputs, 0), dtype=torch.int64))


def align_rows(recipe: RowRecipe, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs (same dtype, vocabulary on dim 0) with rows in the output's token order."""
    if recipe.identity:
        return tensors
    recipe = recipe.to(tensors[0].device)
    defaults = tensors[0].new_zeros((len(recipe.default_ids), *tensors[0].shape[1:]))
    for i, pos, rows in recipe.copies:
        defaults[pos] = tensors[i][rows]
    if len(recipe.average_pos):
        defaults[recipe.average_pos] = _average(tensors, recipe.average_rows)
    out = []
    for i, t in enumerate(tensors):
        rows = t.new_zeros((recipe.rows, *t.shape[1:]))
        own = recipe.own[i]
        takes_own = own >= 0
        rows[:recipe.tokens][takes_own] = t[own[takes_own]]
        rest = ~takes_own[recipe.default_ids]
        rows[recipe.default_ids[rest]] = defaults[rest]
        if recipe.rows > recipe.tokens:  # padding: the mean token row
            rows[recipe.tokens:] = torch.mean(rows[:recipe.tokens], dim=0)
        out.append(rows)
    return out


def _average(tensors: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Mean of the inputs' rows, summed in input order and divided by the count as mergekit does (the
    same roundings in bf16/fp16)."""
    acc = tensors[0].new_zeros((rows.shape[1], *tensors[0].shape[1:]))
    for t, r in zip(tensors, rows):
        has = r >= 0
        acc[has] = acc[has] + t[r[has]]
    counts = (rows >= 0).sum(0)
    for n in counts.unique().tolist():
        block = counts == n
        acc[block] = acc[block] / n
    return acc


@dataclass
class Vocabulary:
    """The output tokenizer, and where each of its tokens is in each input model."""

    tokenizer: Any  # a transformers tokenizer: what the output folder gets
    tokens: list[str]  # output token by id
    rows: int  # output vocabulary size (tokens, padded to pad_to_multiple_of)
    index: dict[str, torch.Tensor]  # model -> int64 [tokens]: the token's row in the model, -1 if absent
    original: dict[str, dict[str, int]]  # model -> its own tokenizer's vocabulary
    vocab_size: dict[str, int]  # model -> rows of its vocabulary-indexed tensors that are tokens
    settings: dict[str, TokenSetting]
    chat_templates: list[str]  # the inputs' tokenizers' chat templates (for `chat_template: auto`)
    _recipes: dict[tuple, RowRecipe] = field(default_factory=dict, repr=False)

    def recipe(self, models: list[str], base: str | None, row_counts: list[int], where: str,
               problems: list[str]) -> RowRecipe | None:
        """The row recipe for one group of inputs (checked: every source a token names is among them)."""
        key = (tuple(models), base, tuple(row_counts))
        if key not in self._recipes:
            try:
                self._recipes[key] = self._build_recipe(models, base, row_counts)
            except ValueError as e:
                problems.append(f"{where}: {e}")
                return None
        return self._recipes[key]

    def _build_recipe(self, models: list[str], base: str | None, row_counts: list[int]) -> RowRecipe:
        index = torch.stack([self.index[m] for m in models])
        present = index >= 0
        forced = torch.tensor([self.settings.get(t, TokenSetting()).force for t in self.tokens], dtype=torch.bool)
        needs_default = (forced | ~present.all(0)).nonzero().flatten()
        sources: dict[int, list[tuple[int, int]]] = {}  # input -> [(position in default_ids, row)]
        averaged, zero_tokens = [], []
        for pos, tid in enumerate(needs_default.tolist()):
            token = self.tokens[tid]
            source = self._source(token, tid, models, base, present[:, tid].tolist())
            if source == "average":
                averaged.append(pos)
            elif source is None:
                zero_tokens += [token] if not present[:, tid].any() else []
            else:
                i, row = self._source_row(token, tid, models, source, row_counts)
                sources.setdefault(i, []).append((pos, row))
        if zero_tokens:
            log.warning("%d token(s) are in no input of this tensor (%s%s); their rows are zeros", len(zero_tokens),
                        ", ".join(map(repr, zero_tokens[:5])), ", ..." if len(zero_tokens) > 5 else "")
        own = index.masked_fill(forced, -1)
        copies = [(i, torch.tensor([p for p, _ in s]), torch.tensor([r for _, r in s])) for i, s in sources.items()]
        average_pos = torch.tensor(averaged, dtype=torch.int64)
        identity = (self.rows == len(self.tokens) and not len(needs_default) and set(row_counts) == {self.rows}
                    and bool((own == torch.arange(self.rows)).all()))
        return RowRecipe(self.rows, len(self.tokens), own, needs_default, copies, average_pos,
                         index[:, needs_default[average_pos]], identity)

    def _source(self, token: str, tid: int, models: list[str], base: str | None, present: list[bool]):
        """Where a token's default row comes from: a TokenSetting source, "average" or None (zeros)."""
        setting = self.settings.get(token)
        if setting is not None and setting.source is not None:
            return None if setting.source.kind == "zero" else setting.source
        if sum(present) == 1:
            return _ModelRow(models[present.index(True)])
        if not any(present):
            return None
        if base in models and present[models.index(base)]:
            return _ModelRow(base)
        return "average"

    def _source_row(self, token: str, tid: int, models: list[str], source, row_counts: list[int]) -> tuple[int, int]:
        if source.model not in models:
            raise ValueError(f"token {token!r} takes its embedding from {source.model}, which is not an input "
                             "of this tensor")
        i = models.index(source.model)
        if source.kind == "model_token":
            row = source.token_id
            if row is None:
                row = self.original[source.model].get(source.token, -1)
                if row < 0:
                    raise ValueError(f"token {token!r}: {source.model} has no token {source.token!r}")
            if row >= row_counts[i]:
                raise ValueError(f"token {token!r}: token id {row} is out of range for {source.model} "
                                 f"({row_counts[i]} rows)")
            return i, row
        row = int(self.index[source.model][tid])
        if row < 0:
            raise ValueError(f"token {token!r} takes its embedding from {source.model}, which lacks it")
        return i, row


@dataclass(frozen=True)
class _ModelRow:
    model: str
    kind: str = "model"


def build_vocabulary(spec: TokenizerSpec, models: dict[str, Any], base: str) -> Vocabulary:
    """The output tokenizer of `spec` and each model's row of each of its tokens. models: referenced
    model -> its Checkpoint (config order); base: the base model, or the first one."""
    transformers = require("transformers", "hf", TOKENIZER_SETTINGS)
    problems: list[str] = []
    tokenizers = {}
    for ref in models:
        try:
            tokenizers[ref] = load_tokenizer(transformers, models[ref].path)
        except Exception as e:  # noqa: BLE001 (transformers raises many kinds)
            if ref == base:
                problems.append(f"{models[ref].path}: cannot load its tokenizer ({one_line(e)})")
            else:
                log.warning("cannot load the tokenizer of %s (%s); assuming it is the base's", ref, one_line(e))
    if problems:
        raise ConfigError(problems, "tokenizer")
    vocab_size = {ref: _vocab_size(models[ref].config, tokenizers.get(ref, tokenizers[base])) for ref in models}
    tokenizers[base] = _strip_unused(tokenizers[base], vocab_size[base], models[base].path)
    original = {ref: tokenizers.get(ref, tokenizers[base]).get_vocab() for ref in models}
    out = _output_tokenizer(spec, tokenizers, base, vocab_size, transformers)
    for token in spec.tokens:  # (mergekit adds these to the base's own tokenizer with source "base", and fails)
        if token not in out.get_vocab():
            out.add_tokens(token)
    vocab = out.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ConfigError([f"the output tokenizer's token ids are not 0..{len(tokens) - 1} without gaps"], "tokenizer")
    index = {}
    for ref, own in original.items():
        rows = [own.get(t, -1) for t in tokens]
        index[ref] = torch.tensor([r if r < vocab_size[ref] else -1 for r in rows], dtype=torch.int64)
    pad = spec.pad_to_multiple_of
    n_rows = -(-len(tokens) // pad) * pad if pad else len(tokens)
    templates = [t for t in map(chat_template_of, tokenizers.values()) if t]
    return Vocabulary(out, tokens, n_rows, index, original, vocab_size, spec.tokens, templates)


def _output_tokenizer(spec: TokenizerSpec, tokenizers: dict, base: str, vocab_size: dict[str, int], transformers):
    if spec.source == "base":
        return _copy(tokenizers[base], transformers)
    if spec.source != "union":
        if not os.path.isdir(spec.source):
            raise ConfigError([f"{spec.source}: the tokenizer source is not a local folder (tokenizers are read from "
                               "model folders; nothing is downloaded)"], "tokenizer")
        try:
            return load_tokenizer(transformers, spec.source)
        except Exception as e:  # noqa: BLE001
            raise ConfigError([f"{spec.source}: cannot load its tokenizer ({one_line(e)})"], "tokenizer") from e
    return _union(tokenizers, base, vocab_size, transformers)


def _union(tokenizers: dict, base: str, vocab_size: dict[str, int], transformers):
    """The base tokenizer plus every other model's tokens: plain tokens first (model by model in config
    order, each in its id order), then added tokens (the first model's settings win). mergekit adds them
    in hash order, which changes from run to run; this order does not."""
    plain, added = {}, {}
    for ref, tok in [(base, tokenizers[base])] + [(r, t) for r, t in tokenizers.items() if r != base]:
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        vocab = tok.get_vocab()
        for token in sorted(vocab, key=vocab.get):
            if vocab[token] < vocab_size[ref] and token not in added_names:
                plain.setdefault(token, None)
        for tid, info in decoder.items():
            if tid < vocab_size[ref]:
                added.setdefault(info.content, info)
    out = _copy(tokenizers[base], transformers)
    base_vocab = tokenizers[base].get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _copy(tokenizer, transformers):
    """A separate tokenizer equal to this one (tokens added to it leave the original as it is)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)


def _strip_unused(tokenizer, vocab_size: int, path: str):
    """The tokenizer without tokens whose ids are past the model's vocabulary (rows it has no weights for)."""
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    state = json.loads(tokenizer._tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ConfigError([f"{path}: its tokenizer has {len(unused)} token(s) past the model's {vocab_size} rows "
                           f"and is {state['model']['type']}, not BPE; only BPE tokenizers can be trimmed"],
                          "tokenizer")
    state["added_tokens"] = [a for a in state["added_tokens"] if a["id"] < vocab_size]
    state["model"]["vocab"] = {t: i for t, i in state["model"]["vocab"].items() if t not in unused}
    prefix = state["model"].get("continuing_subword_prefix") or ""

    def keep(merge) -> bool:  # neither part nor the merged token is removed (mergekit checks the parts only)
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        return not {a, b, a + b.removeprefix(prefix)} & unused
    state["model"]["merges"] = [m for m in state["model"]["merges"] if keep(m)]
    from tokenizers import Tokenizer
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
    return tokenizer


def _vocab_size(model_config: dict, tokenizer) -> int:
    """Rows of a model's vocabulary-indexed tensors that are tokens: its config's vocab_size."""
    for cfg in (model_config, model_config.get("text_config") or {}):
        if isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return len(tokenizer.get_vocab())


def chat_template_of(tokenizer) -> str | None:
    """A tokenizer's chat template (the default one where it keeps several)."""
    template = tokenizer.chat_template
    return template.get("default") if isinstance(template, dict) else template


def set_vocab_size(model_config: dict, rows: int) -> None:
    """Write the output's vocabulary size where the donor's config.json keeps it."""
    text = model_config.get("text_config")
    if "vocab_size" not in model_config and isinstance(text, dict) and "vocab_size" in text:
        model_config["text_config"] = {**text, "vocab_size": rows}
    else:
        model_config["vocab_size"] = rows


def save_tokenizer(tokenizer, chat_template: str | None, folder: str) -> list[str]:
    """Save a tokenizer (with its chat template set) into folder; the files written."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.init_kwargs.pop("local_files_only", None)  # how load_tokenizer loaded it (offline), not a setting
    tokenizer.save_pretrained(folder)
    return sorted(os.listdir(folder))


