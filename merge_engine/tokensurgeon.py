"""A model given a donor model's tokenizer, as mergekit-tokensurgeon 0.1.5 gives it
(`merge-engine tokensurgeon MODEL DONOR OUT [options]`): models with different tokenizers can then be merged.

The output is MODEL with its input embeddings and output head rebuilt row by row in DONOR's token order, DONOR's
tokenizer, and config.json with DONOR's vocabulary size and special token ids. Tokens are compared normalised
(mergekit's rule: a word-start marker, 'Ġ' or '▁' by tokenizer class, read as a flag, special tokens by their role).
Each row of a donor token is
- the model's row of the same token; else, with --byte-match, of the byte token naming the same character
  (`<0x41>` and `A`); else, with --prefix-match, of the token's longest prefix the model has;
- else approximated from the donor's row of it (token_approximation.py): by default as a combination of k tokens
  both vocabularies share (orthogonal matching pursuit on the donor's rows, the same coefficients on the model's);
- zeros for --magikarp's junk tokens (under-trained in both models) and for donor tokens past the donor's rows.
A bias of the head takes its rows by token too (zeros for new tokens); every other tensor is copied.

Random draws (--approximation-method randn and john_hewitt, landmark_pca's randomized PCA, --new-vocab-noise)
come from one generator seeded by --random-seed, drawn as mergekit draws them: the same seed gives mergekit's draws
(assigned to the new tokens in id order: mergekit's order changes from run to run) and the same files every run.

Differences from mergekit, each where mergekit fails or misreads: `stb` uses --k (mergekit passes its options
object and fails); `mp_rope` reads the RoPE base from `rope_parameters` too (transformers 5's configs, where
mergekit fails); `--prefix-match/--byte-match embed` and `lm_head` apply to the matrix they name (mergekit 0.1.5
applies `embed` to the head and `lm_head` to the embeddings); `mean` with --new-vocab-noise adds the noise (mergekit
fails writing into a broadcast row); common_interpolation's weights meet the rows in fp32 (mergekit fails on bf16
and fp16 models); random draws come from a CPU generator on every --device; a model token's pieces past the model's
rows are passed over (mergekit fails); john_hewitt's fallback draws the right number of rows; least-squares solves
are the same from run to run (token_approximation.py). Tokenizers load from local files without their own code.
Everything is checked (tensors present and 2-D, enough shared tokens for k, options, the output folder) before any
tensor is read, and the output is written to a temporary folder moved into place when complete.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass

import torch

from merge_engine import token_approximation as approx
from merge_engine.devices import resolve_device
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError
from merge_engine.extras import BUILDING_TRANSFORMERS_MODEL, require, transformers_config_errors
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.hub_cache import local_reference
from merge_engine.io.lora import open_model
from merge_engine.io.writer import ShardedWriter, check_output_apart, check_output_dir
from merge_engine.plan import TIED_HEADS
from merge_engine.progress import progress_bar
from merge_engine.vocabulary import load_tokenizer, one_line, save_tokenizer

log = logging.getLogger("merge_engine")

METHODS = ("omp", "common_interpolation", "subword", "mean", "zero", "randn", "john_hewitt", "landmark_pca", "stb",
           "mp_rope")
SHARED_TOKEN_METHODS = ("omp", "common_interpolation", "landmark_pca", "stb", "mp_rope")  # need shared tokens
MATCH_CHOICES = ("no", "yes", "embed", "lm_head")
DONOR_CONFIG_KEYS = ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "mask_token_id",
                     "padding_side")


@dataclass
class SurgeryOptions:
    method: str = "omp"
    k: int = 64
    cosine_similarity: bool = False
    weight_scheme: str = "distance_proportional"
    subword_method: str = "mean"
    batch_size: int | None = 512  # tokens approximated at once; None or <= 0: all at once
    prefix_match: str = "no"  # no, yes, embed or lm_head: which matrices take a prefix's row
    byte_match: str = "no"
    magikarp: bool = False
    new_vocab_noise: float | None = None
    new_vocab_scale: float | None = None
    random_seed: int | None = None
    device: str = "cpu"
    out_shard_size: int = 5 * 10**9
    overwrite: bool = False
    hub_cache: str | None = None
    quiet: bool = False  # no progress bar


@dataclass
class TokenCounts:
    exact: int = 0
    byte: int = 0
    prefix: int = 0
    approximated: int = 0
    junk: int = 0

    def __str__(self) -> str:
        return (f"{self.exact} same token, {self.byte} byte token, {self.prefix} prefix, {self.approximated} "
                f"approximated, {self.junk} zeroed")


@dataclass
class SurgeryReport:
    out_dir: str
    vocab_size: int
    counts: dict[str, TokenCounts]  # tensor name -> how its rows were found

    def summary(self) -> str:
        parts = "; ".join(f"{name}: {c}" for name, c in self.counts.items())
        return f"gave the model the donor's tokenizer ({self.vocab_size} tokens; {parts}) -> {self.out_dir}"


@dataclass
class Matrix:
    """A vocabulary matrix: where it is in the model and in the donor (None: absent)."""

    name: str
    donor_name: str | None
    is_head: bool


# ---------------------------------------------------------------------------------------------------- the plan

def transplant_tokenizer(model: str, donor: str, out_dir: str, options: SurgeryOptions | None = None
                         ) -> SurgeryReport:
    """Write model with donor's tokenizer into out_dir (module docstring)."""
    options = options or SurgeryOptions()
    check_options(options)
    transformers = require("transformers", "hf", "merge-engine tokensurgeon")
    orig, giver = (open_model(local_reference(ref, options.hub_cache)) for ref in (model, donor))
    try:
        check_output_apart(out_dir, orig.folders + giver.folders)
        check_output_dir(out_dir, options.overwrite)  # (now, not after every row is computed)
        configs = [model_config(transformers, ckpt) for ckpt in (orig, giver)]
        matrices, donor_head = plan_matrices(transformers, orig, giver, configs)
        tokenizers = [_tokenizer(ckpt) for ckpt in (orig, giver)]
        vocabs = [normalized_vocabulary(transformers, t) for t in tokenizers]
        device = resolve_device(options.device)
        generator = torch.Generator()
        generator.manual_seed(options.random_seed) if options.random_seed is not None else generator.seed()
        built, counts, out_vocab = _build(matrices, donor_head, orig, giver, tokenizers[0], vocabs, options, device,
                                          generator)
        entries = [(name, built[name].dtype if name in built else info.dtype,
                    tuple(built[name].shape) if name in built else tuple(info.shape))
                   for name, info in orig.tensors.items()]
        writer = ShardedWriter(out_dir, entries, options.out_shard_size, options.overwrite)
        with writer.completing():
            for name, _, _ in entries:
                writer.write(name, built[name].cpu() if name in built else orig.read(name))
            orig.check_unchanged()
            giver.check_unchanged()
            writer.add_file("config.json", output_config(*configs, out_vocab))
            with tempfile.TemporaryDirectory() as tmp:
                for f in save_tokenizer(tokenizers[1], None, tmp):
                    writer.copy_file(os.path.join(tmp, f))
    finally:
        orig.close()
        giver.close()
    return SurgeryReport(writer.out_dir, out_vocab, counts)


def check_options(options: SurgeryOptions) -> None:
    problems = []
    if options.method not in METHODS:
        problems.append(f"approximation method {options.method!r} is not one of {', '.join(METHODS)}")
    if type(options.k) is not int or options.k < 1:
        problems.append(f"k must be a whole number of at least 1, got {options.k!r}")
    if options.weight_scheme not in approx.WEIGHT_SCHEMES:
        problems.append(f"weight scheme {options.weight_scheme!r} is not one of {', '.join(approx.WEIGHT_SCHEMES)}")
    if options.subword_method not in approx.SUBWORD_METHODS:
        problems.append(f"subword method {options.subword_method!r} is not one of "
                        f"{', '.join(approx.SUBWORD_METHODS)}")
    for key in ("prefix_match", "byte_match"):
        if getattr(options, key) not in MATCH_CHOICES:
            problems.append(f"{key} {getattr(options, key)!r} is not one of {', '.join(MATCH_CHOICES)}")
    for key in ("new_vocab_noise", "new_vocab_scale"):  # (NaN or infinity would fill the new rows with it)
        value = getattr(options, key)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
            problems.append(f"{key} must be a finite number, got {value!r}")
    if problems:
        raise MergeEngineError("; ".join(problems))


def model_config(transformers, ckpt: Checkpoint):
    """config.json as transformers reads it (without code the folder ships); one line where it cannot."""
    try:
        return transformers.AutoConfig.from_pretrained(ckpt.path, local_files_only=True, trust_remote_code=False)
    except transformers_config_errors() as e:
        raise CheckpointError(f"{ckpt.path}: transformers cannot read its config.json ({one_line(e)})") from e


def plan_matrices(transformers, orig: Checkpoint, giver: Checkpoint, configs: list
                  ) -> tuple[list[Matrix], str | None]:
    """The model's input embeddings and (when it stores one) output head, where the donor keeps each, and the
    donor's head (a donor whose head is tied: its embeddings); ConfigError naming every tensor missing or not a
    matrix."""
    embed, head = _vocabulary_modules(transformers, orig, configs[0])
    donor_embed, donor_head = _vocabulary_modules(transformers, giver, configs[1])
    problems = []
    if embed not in orig.tensors:
        problems.append(f"{orig.path}: tensor '{embed}' (its input embeddings) is missing")
    matrices = [Matrix(embed, donor_embed if donor_embed in giver.tensors else None, False)]
    donor_head = next((t for t in (donor_head, donor_embed) if t in giver.tensors), None)
    if head is not None and head in orig.tensors:
        matrices.append(Matrix(head, donor_head, True))
    for m in matrices:
        if m.donor_name is None:
            problems.append(f"{giver.path}: the donor has no tensor for the model's '{m.name}'")
        for ckpt, name in ((orig, m.name), (giver, m.donor_name)):
            if name in ckpt.tensors and len(ckpt.tensors[name].shape) != 2:
                problems.append(f"{ckpt.path}: tensor '{name}' is {list(ckpt.tensors[name].shape)}, not a matrix")
    if problems:
        raise ConfigError(problems, "inputs")
    return matrices, donor_head


def _vocabulary_modules(transformers, ckpt: Checkpoint, config) -> tuple[str, str | None]:
    """The weights of the input embeddings and output head: the common names (plan.TIED_HEADS) where the checkpoint
    has such embeddings, else those of the model transformers builds from config.json (on the meta device: seconds
    of imports for one architecture's code)."""
    for head, embeddings in TIED_HEADS.items():
        known = next((e for e in embeddings if e in ckpt.tensors), None)
        if known is not None:
            return known, head
    try:
        with BUILDING_TRANSFORMERS_MODEL, torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except transformers_config_errors() as e:
        raise CheckpointError(f"{ckpt.path}: cannot build its model from config.json ({one_line(e)})") from e
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    return f"{names[id(model.get_input_embeddings())]}.weight", (f"{names[id(head)]}.weight" if head is not None
                                                                 else None)


def _tokenizer(ckpt: Checkpoint):
    try:
        return load_tokenizer(require("transformers", "hf", "merge-engine tokensurgeon"), ckpt.path)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: its tokenizer cannot be loaded ({one_line(e)})") from e


# -------------------------------------------------------------------------------------------- the vocabularies

WORD_START, SPECIAL = "word_start", "special"
_GPT2_STYLE = ("GPT2Tokenizer", "GPT2TokenizerFast", "OpenAIGPTTokenizer", "OpenAIGPTTokenizerFast",
               "Qwen2Tokenizer", "Qwen2TokenizerFast")
_SENTENCEPIECE_STYLE = ("LlamaTokenizer", "LlamaTokenizerFast", "T5Tokenizer", "T5TokenizerFast", "GemmaTokenizer",
                        "GemmaTokenizerFast")


def normalized_vocabulary(transformers, tokenizer) -> dict:
    """{normalised token: id} in id order: a token starting with the word-start marker as (WORD_START, rest), a
    special token as (SPECIAL, its role), any other as itself; where two tokens read the same, the lower id.
    (mergekit keeps get_vocab()'s order, which a fast tokenizer gives from a hash map: it changes from run to run,
    and with it which new token gets which random draw and which of two such tokens is kept.)"""
    vocab = tokenizer.get_vocab()
    classes = lambda names: tuple(getattr(transformers, n) for n in names if hasattr(transformers, n))  # noqa: E731
    if isinstance(tokenizer, classes(_GPT2_STYLE)):
        marker = "Ġ"
    elif isinstance(tokenizer, classes(_SENTENCEPIECE_STYLE)):
        marker = "Ġ" if "Ġhello" in vocab else "▁"  # (DeepSeek's Llama tokenizer is byte-level)
    else:
        log.warning("%s: a tokenizer of unknown style (%s): assuming 'Ġ' marks a word start",
                    tokenizer.name_or_path, type(tokenizer).__name__)
        marker = "Ġ"
    roles = {role: [v] if isinstance(v, str) else list(v) for role, v in tokenizer.special_tokens_map.items()}
    out = {}
    for token, i in sorted(vocab.items(), key=lambda item: item[1]):
        out.setdefault(_normalized(token, roles, marker), i)
    return out


def _normalized(token: str, roles: dict[str, list[str]], marker: str):
    if token.startswith(marker):
        return (WORD_START, token[len(marker):])
    return next(((SPECIAL, role) for role, values in roles.items() if token in values), token)


def token_text(token) -> str:
    """The text a normalised token stands for (a special token: its role's name, as mergekit reads it)."""
    if isinstance(token, tuple):
        return " " + token[1] if token[0] == WORD_START else token[1]
    return token


def byte_token_match(token, vocab: dict) -> int | None:
    """The id of the byte token `<0xHH>` naming a one-character token, or of the character a byte token names."""
    if not isinstance(token, str):
        return None
    if len(token) == 1 and ord(token) < 256:
        return vocab.get(f"<0x{ord(token):02X}>")
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
        try:
            return vocab.get(chr(int(token[3:-1], 16)))
        except ValueError:
            return None
    return None


def prefix_match(token, vocab: dict) -> int | None:
    """The id of the token's longest proper prefix in vocab (not for special tokens; a prefix of only spaces
    ends the search)."""
    marker, text = token if isinstance(token, tuple) else (None, token)
    if marker == SPECIAL:
        return None
    for end in range(len(text) - 1, 0, -1):
        prefix = text[:end]
        if not prefix.strip():
            return None
        key = (marker, prefix) if marker is not None else prefix
        if key in vocab:
            return vocab[key]
    return None


def _magikarp(vocabs: list[dict], embeds: list[torch.Tensor], heads: list[torch.Tensor | None]
              ) -> tuple[dict, list[int]]:
    """(the model's vocabulary kept to the tokens well trained in both models, the donor's junk ids: tokens well
    trained in neither)."""
    good = [_well_trained(v, e, h) for v, e, h in zip(vocabs, embeds, heads)]
    both = good[0] & good[1]
    log.info("--magikarp: %d tokens are well trained in both models", len(both))
    orig_vocab = {t: i for t, i in vocabs[0].items() if t in both}
    junk = [i for t, i in vocabs[1].items() if t not in good[1] and t not in good[0]]
    return orig_vocab, junk


def _well_trained(vocab: dict, embed: torch.Tensor, head: torch.Tensor | None) -> set:
    unused = set(range(embed.shape[0])) - set(vocab.values())  # (built in mergekit's order: see under_trained_rows)
    for token, i in vocab.items():
        text = token_text(token)
        if ("unused_token" in text or "reserved_special_token" in text) and i < embed.shape[0]:
            unused.add(i)
    bad = approx.under_trained_rows(embed, head, unused)
    return {t for t, i in vocab.items() if i not in bad}


# ------------------------------------------------------------------------------------------------ the compute

def _build(matrices: list[Matrix], donor_head: str | None, orig: Checkpoint, giver: Checkpoint, orig_tokenizer,
           vocabs: list[dict], options: SurgeryOptions, device: torch.device, generator: torch.Generator):
    """{tensor name: its new rows} for each vocabulary matrix (and a head's bias), how each matrix's rows were
    found, and the output's vocabulary size."""
    orig_vocab, donor_vocab = vocabs
    out_vocab = max(len(donor_vocab), max(donor_vocab.values()) + 1)
    shapes = {m.name: (orig.tensors[m.name].shape, giver.tensors[m.donor_name].shape) for m in matrices}
    _check_shared(shapes, orig_vocab, donor_vocab, options)
    rope = rope_settings(giver, orig, options)
    tensors = {m.name: (orig.read(m.name).to(device), giver.read(m.donor_name).to(device)) for m in matrices}
    heads = {m.is_head: m.name for m in matrices}
    junk = []
    if options.magikarp:  # (the donor's head: its own, or its embeddings where tied, even for a tied model)
        head_of = [tensors[heads[True]][0] if True in heads else None,
                   tensors[heads[True]][1] if True in heads else giver.read(donor_head).to(device)]
        orig_vocab, junk = _magikarp(vocabs, [tensors[heads[False]][i] for i in (0, 1)], head_of)
        _check_shared(shapes, orig_vocab, donor_vocab, options)  # (fewer model tokens now)
    built, counts = {}, {}
    for m in matrices:
        rows = RowSources(m, *tensors[m.name], orig_vocab, donor_vocab, junk, options, rope)
        built[m.name], counts[m.name] = rows.build(out_vocab, orig_tokenizer, options, generator)
        log.debug("%s: %s", m.name, counts[m.name])
    bias = _head_bias(matrices, orig, heads)
    if bias is not None:
        built[bias] = remap_rows(orig.read(bias), orig_vocab, donor_vocab, out_vocab)
    return built, counts, out_vocab


def _check_shared(shapes: dict, orig_vocab: dict, donor_vocab: dict, options: SurgeryOptions) -> None:
    """Enough shared tokens for --k (landmark_pca: for the smaller width), from the matrices' shapes
    {name: (model's, donor's)}."""
    if options.method not in SHARED_TOKEN_METHODS:
        return
    problems = []
    for name, (orig_shape, donor_shape) in shapes.items():
        orig_rows, donor_rows = _within(orig_vocab, orig_shape[0]), _within(donor_vocab, donor_shape[0])
        if donor_rows.keys() <= orig_rows.keys():  # nothing to approximate: k is never used (nor by mergekit)
            continue
        shared = len(_shared_tokens(orig_rows, donor_rows))
        pca = options.method == "landmark_pca"
        need = min(orig_shape[1], donor_shape[1]) if pca else options.k
        if shared < need:
            problems.append(f"'{name}': {options.method} needs at least {need} tokens both vocabularies share "
                            f"({'the smaller width' if pca else '--k'}); they share {shared}")
    if problems:
        raise ConfigError(problems, "inputs")


def rope_settings(giver: Checkpoint, orig: Checkpoint, options: SurgeryOptions) -> tuple:
    """mp_rope's (donor heads, model heads, donor RoPE base, model RoPE base) from config.json (the base from
    rope_theta or transformers 5's rope_parameters; 10000 where neither is given); () for other methods.
    ConfigError where a width is not a whole number of even-sized heads, or layer types have different bases."""
    if options.method != "mp_rope":
        return ()
    heads, bases, problems = [], [], []
    for ckpt in (giver, orig):
        config = ckpt.config
        n = config.get("num_attention_heads")
        width = config.get("hidden_size")
        if n is None and width is None:  # (mergekit fails on such models too: it reads config.rope_theta)
            problems.append(f"{ckpt.path}: mp_rope needs a RoPE model's num_attention_heads and hidden_size, "
                            f"config.json (model_type {config.get('model_type')!r}) has neither: use another "
                            "--approximation-method")
        elif type(n) is not int or n < 1 or type(width) is not int or width % n or (width // n) % 2:
            problems.append(f"{ckpt.path}: mp_rope needs num_attention_heads dividing hidden_size into heads of even "
                            f"size, config.json gives {n} and {width}")
        base = _rope_base(config)
        if isinstance(base, dict):
            problems.append(f"{ckpt.path}: mp_rope needs one RoPE base, config.json's rope_parameters gives one per "
                            f"layer type ({', '.join(f'{kind}: {theta}' for kind, theta in base.items())}): use "
                            f"another --approximation-method")
        elif type(base) not in (int, float) or not base > 0:
            problems.append(f"{ckpt.path}: mp_rope needs a positive RoPE base, config.json gives {base!r}")
        heads.append(n)
        bases.append(base)
    if problems:
        raise ConfigError(problems, "inputs")
    return heads[0], heads[1], float(bases[0]), float(bases[1])


def _rope_base(config: dict):
    """config.json's RoPE base (as given: checked by the caller); where rope_parameters holds one per layer type
    (Gemma 3's), the one they share, or {layer type: base} where they differ."""
    parameters = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    base = config.get("rope_theta") or parameters.get("rope_theta")
    by_kind = {kind: p.get("rope_theta") for kind, p in parameters.items() if isinstance(p, dict) and "rope_theta" in p}
    if base is None and len(set(by_kind.values())) > 1:
        return by_kind
    return base or next(iter(by_kind.values()), None) or 10000.0


def _within(vocab: dict, rows: int) -> dict:
    return {t: i for t, i in vocab.items() if i < rows}


def _shared_tokens(orig_vocab: dict, donor_vocab: dict) -> list:
    return sorted(orig_vocab.keys() & donor_vocab.keys(), key=lambda t: donor_vocab[t])


def _head_bias(matrices: list[Matrix], orig: Checkpoint, heads: dict) -> str | None:
    if True not in heads:
        return None
    bias = heads[True].removesuffix(".weight") + ".bias"
    return bias if bias in orig.tensors and len(orig.tensors[bias].shape) == 1 else None


def remap_rows(tensor: torch.Tensor, orig_vocab: dict, donor_vocab: dict, rows: int) -> torch.Tensor:
    """A tensor indexed by token (dim 0) in the donor's token order: the model's row where it has the token, zeros
    elsewhere."""
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    for token, target in donor_vocab.items():
        source = orig_vocab.get(token)
        if source is not None and 0 <= source < tensor.shape[0]:
            out[target] = tensor[source]
    return out


class RowSources:
    """Where each output row of one matrix comes from, and the rows themselves."""

    def __init__(self, m: Matrix, orig_t: torch.Tensor, donor_t: torch.Tensor, orig_vocab: dict, donor_vocab: dict,
                 junk: list[int], options: SurgeryOptions, rope: tuple = ()):
        self.m, self.orig_t, self.donor_t, self.rope = m, orig_t, donor_t, rope
        self.orig_vocab, self.donor_vocab = _within(orig_vocab, orig_t.shape[0]), _within(donor_vocab,
                                                                                          donor_t.shape[0])
        for role, (full, kept, t) in {"model": (orig_vocab, self.orig_vocab, orig_t),
                                      "donor": (donor_vocab, self.donor_vocab, donor_t)}.items():
            if len(kept) < len(full):
                log.warning("%s: %d %s tokens have ids past its %d rows: passed over", m.name, len(full) - len(kept),
                            role, t.shape[0])
        past = [i for i in donor_vocab.values() if i >= donor_t.shape[0]]
        self.junk = sorted(set(junk) | set(past)) if past else junk
        which = "lm_head" if m.is_head else "embed"
        self.allow_byte = options.byte_match in ("yes", which)
        self.allow_prefix = options.prefix_match in ("yes", which)

    def build(self, out_vocab: int, orig_tokenizer, options: SurgeryOptions, generator: torch.Generator
              ) -> tuple[torch.Tensor, TokenCounts]:
        out = torch.zeros(out_vocab, self.orig_t.shape[1], device=self.orig_t.device, dtype=self.orig_t.dtype)
        counts, new = TokenCounts(), []
        for token, row in self.donor_vocab.items():
            source, kind = self._matched(token)
            if source is None:
                new.append(token)
            else:
                out[row] = self.orig_t[source]
            setattr(counts, kind, getattr(counts, kind) + 1)
        if new:
            self._approximate(out, new, orig_tokenizer, options, generator)
        out[self.junk] = 0
        counts.junk = len(self.junk)
        return out, counts

    def _matched(self, token) -> tuple[int | None, str]:
        if token in self.orig_vocab:
            return self.orig_vocab[token], "exact"
        if self.allow_byte and (i := byte_token_match(token, self.orig_vocab)) is not None:
            return i, "byte"
        if self.allow_prefix and (i := prefix_match(token, self.orig_vocab)) is not None:
            return i, "prefix"
        return None, "approximated"

    def _approximate(self, out: torch.Tensor, tokens: list, orig_tokenizer, options: SurgeryOptions,
                     generator: torch.Generator) -> None:
        """The new tokens' rows, batch by batch (mergekit's batches: the same rows, the same draws)."""
        size = options.batch_size if options.batch_size and options.batch_size > 0 else len(tokens)
        shared = _shared_tokens(self.orig_vocab, self.donor_vocab)
        # the shared tokens' rows, gathered once for every batch
        landmarks = self._rows_of(shared) if options.method in SHARED_TOKEN_METHODS and options.method != "stb" \
            else None
        basis = self._token_basis(shared, options.k) if options.method == "stb" else None
        with progress_bar(total=len(tokens), unit="token", desc=f"approximating {self.m.name}",
                          disable=options.quiet) as bar:
            for start in range(0, len(tokens), size):
                batch = tokens[start:start + size]
                rows = self._rows(batch, landmarks, basis, orig_tokenizer, options, generator)
                if options.new_vocab_noise:
                    rows = rows + approx.standard_normal(rows.shape, rows.dtype, rows.device,
                                                         generator) * options.new_vocab_noise
                if options.new_vocab_scale:
                    rows = rows * options.new_vocab_scale
                for i, token in enumerate(batch):
                    out[self.donor_vocab[token]] = rows[i]
                bar.update(len(batch))

    def _rows(self, batch: list, landmarks: tuple | None, basis, orig_tokenizer, options: SurgeryOptions,
              generator: torch.Generator) -> torch.Tensor:
        method, orig_t = options.method, self.orig_t
        targets = self.donor_t[torch.tensor([self.donor_vocab[t] for t in batch])]
        if method == "mean":
            return orig_t.mean(dim=0).unsqueeze(0).expand(len(batch), -1)
        if method == "zero":
            return torch.zeros(len(batch), orig_t.shape[1], device=orig_t.device, dtype=orig_t.dtype)
        if method == "randn":
            return approx.standard_normal((len(batch), orig_t.shape[1]), orig_t.dtype, orig_t.device, generator)
        if method == "john_hewitt":
            return approx.john_hewitt_rows(orig_t, len(batch), generator)
        if method == "subword":
            return approx.subword_rows(orig_t, self._pieces(batch, orig_tokenizer), self.m.is_head,
                                       options.subword_method)
        if method == "stb":
            return approx.from_token_basis(targets, self.donor_t, orig_t, basis)
        donor_shared, orig_shared = landmarks
        if method == "landmark_pca":
            return approx.landmark_pca(targets, donor_shared, orig_shared, generator)
        if method == "mp_rope":
            return approx.matching_pursuit_rope(targets, donor_shared, orig_shared, options.k, *self.rope)
        if method == "common_interpolation":
            indices, coefficients = approx.interpolation_weights(targets, donor_shared, options.k,
                                                                 options.cosine_similarity, options.weight_scheme)
        else:
            indices, coefficients = approx.orthogonal_matching_pursuit(targets, donor_shared, options.k)
        return approx.combine_rows(indices, coefficients, orig_shared)

    def _pieces(self, batch: list, orig_tokenizer) -> list[list[int]]:
        """The model tokenizer's ids for each token's text, those past the model's rows passed over."""
        pieces = [orig_tokenizer(token_text(t), add_special_tokens=False)["input_ids"] for t in batch]
        return [[i for i in ids if i < self.orig_t.shape[0]] for ids in pieces]

    def _rows_of(self, tokens: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(the donor's rows, the model's rows) of tokens both have."""
        return (self.donor_t[torch.tensor([self.donor_vocab[t] for t in tokens])],
                self.orig_t[torch.tensor([self.orig_vocab[t] for t in tokens])])

    def _token_basis(self, shared: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        junk = set(self.junk)
        return approx.token_basis(*self._rows_of([t for t in shared if self.donor_vocab[t] not in junk]), k)


# ------------------------------------------------------------------------------------------------ the output

def output_config(out, donor, vocab_size: int) -> str:
    """The model's config.json (its transformers config, changed here) with the donor's vocabulary size and special
    token ids, as mergekit writes it."""
    out.vocab_size = vocab_size
    for key in DONOR_CONFIG_KEYS:
        if hasattr(donor, key):
            setattr(out, key, getattr(donor, key))
    return out.to_json_string(use_diff=True)
