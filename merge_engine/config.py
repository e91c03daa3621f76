"""mergekit 0.1.x YAML configs: parsing and whole-config validation (every problem reported at once).

A `models:` config is normalised the way mergekit does it: one slice spanning every layer, with the
base model appended as an input when it is not listed. A `modules:` config is each module's slices (its
`models:` normalised so) one after the other, each slice naming its module.
"""
from __future__ import annotations

import difflib
import io
import reprlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from merge_engine.dtypes import DTYPES
from merge_engine.errors import CheckpointError, ConfigError
from merge_engine.io.untrusted import is_file_name, is_text, open_regular
from merge_engine.methods import REGISTRY, MergeMethod
from merge_engine.parameters import (
    ParamSpec,
    Scope,
    extra_keys,
    gives,
    holds_empty_list,
    is_boolean_number,
    lax_bool,
    lax_int,
    setting_leaves,
    setting_shape_problem,
)

_KNOWN_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "dtype", "out_dtype",
               "tokenizer_source", "tokenizer", "chat_template", "parameters"}


# Per-model statistics a method reads beside the weights, named by a key next to `model:`.
SIDE_INPUT_KEYS = ("fisher", "grams")
WRITTEN_BY = {"fisher": "merge-engine fisher", "grams": "merge-engine stats"}  # the command that makes each
WEIGHT_SHAPED_SIDE_INPUTS = ("fisher",)  # one value per weight element (a Gram is over input features)


@dataclass
class Source:
    model: str
    layer_range: tuple[int, int] | None  # None: every layer of the model (a `models:` entry)
    parameters: dict[str, Any] | None = None
    side: dict[str, str] = field(default_factory=dict)  # side-input kind -> folder (e.g. fisher: PATH)


@dataclass
class Slice:
    sources: list[Source]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    where: str = "models"  # how messages name it: "models", "slices[2]", "modules.vision_tower.models"
    module: str | None = None  # the module of a `modules:` config it belongs to
    module_parameters: dict[str, Any] | None = None  # that module's parameters (between the slice's and the config's)


@dataclass
class TokenSource:
    """Where a token's embedding row comes from (`tokenizer.tokens.NAME.source`)."""

    kind: str  # "model" (the token's own row in that model), "model_token" (a chosen row) or "zero"
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass
class TokenSetting:
    source: TokenSource | None = None
    force: bool = False  # use the source even where a model has the token itself


@dataclass
class TokenizerSpec:
    """The output vocabulary (`tokenizer_source:` or `tokenizer:`): inputs' vocabulary-indexed tensors
    are aligned to it row by row before merging, as mergekit does."""

    source: str  # "union", "base" or a model folder
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass
class MergeConfig:
    method: MergeMethod
    slices: list[Slice]
    base_model: str | None = None
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None  # "auto", a built-in name or a Jinja template
    parameters: dict[str, Any] | None = None
    modules: list[str] = field(default_factory=list)  # a `modules:` config's modules, in its order
    hub_ids: dict[str, str] = field(default_factory=dict)  # local folder -> the Hub id it was found by (hub_cache.py)
    raw: dict = field(default_factory=dict)  # the config as the user wrote it
    # the YAML file's text, when the config was read from one: saved beside the output as it is, as mergekit saves it
    # (else the output gets raw as YAML)
    text: str | None = None

    def slice_base(self, s: Slice) -> str | None:
        return s.base_model or self.base_model

    def scopes(self, s: Slice) -> list[dict[str, Any] | None]:
        """The parameter scopes above a slice's sources, most specific first: the slice's, its module's, the
        config's (as mergekit's ConfigReader yields them)."""
        return [s.parameters, s.module_parameters, self.parameters]

    def referenced_models(self) -> list[str]:
        seen = dict.fromkeys([self.base_model] if self.base_model else [])
        for s in self.slices:
            seen.update(dict.fromkeys(src.model for src in s.sources))
            if s.base_model:
                seen[s.base_model] = None
        return list(seen)


def load_config(path: str, strict: bool = False) -> MergeConfig:
    """Read and validate a YAML config file."""
    content, text = read_yaml_and_text(path, strict)
    config = parse_config(content, source=path, strict=strict)
    config.text = text
    return config


MAX_PAD_MULTIPLE = 65536  # tokenizer.pad_to_multiple_of: 64 to 256 in practice; larger would add rows by the million
MAX_YAML_VALUES = 1_000_000  # a config's values, aliases expanded: far above any real config's


def read_yaml(path: str, strict: bool = False):
    """A YAML file's content, or ConfigError saying why it cannot be read. A key given twice in one mapping
    keeps its later value, as in mergekit (PyYAML), with a warning; strict refuses it."""
    return read_yaml_and_text(path, strict)[0]


def read_yaml_and_text(path: str, strict: bool = False) -> tuple[Any, str]:
    """read_yaml, and the file's text."""
    return _read_yaml(path, strict, every_document=False)


def read_yaml_documents(path: str, strict: bool = False) -> list[Any]:
    """Every document of a YAML file (`---` between them), as read_yaml reads one."""
    return _read_yaml(path, strict, every_document=True)[0]


def _read_yaml(path: str, strict: bool, every_document: bool) -> tuple[Any, str]:
    try:
        with io.TextIOWrapper(open_regular(path), encoding="utf-8") as f:  # a FIFO would block: refused
            text = f.read()
            loader = _RepeatedKeysLoader(text)
            try:
                content = _documents(loader) if every_document else loader.get_single_data()
            finally:
                loader.dispose()
        if expands_beyond(content, MAX_YAML_VALUES):  # nested aliases ("billion laughs"): every walk of the
            raise ConfigError([f"the YAML expands to more than {MAX_YAML_VALUES:,} values through its aliases"],
                              path)  # content (checks, copies, fingerprints) would take minutes and gigabytes
    except CheckpointError as e:
        raise ConfigError([str(e).removeprefix(f"{path}: ")], path) from None
    except OSError as e:
        raise ConfigError([f"cannot read config: {e.strerror or e}"], path) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start}: {e.reason})"], path) from e
    except yaml.YAMLError as e:
        raise ConfigError([yaml_problem(e)], path) from e
    except RecursionError:  # the parser recurses once per level of nesting
        raise ConfigError(["invalid YAML: nested too deeply"], path) from None
    repeated = [f"line {line}: key {key!r} is given again (first on line {first}), and this later value replaces "
                "it" for key, first, line in loader.repeated_keys]
    if repeated and strict:
        raise ConfigError([f"{r} (refused by --strict)" for r in repeated], path)
    for r in repeated:
        warnings.warn(f"{path}: {r}, as mergekit reads it", stacklevel=3)
    return content, text


def _documents(loader: yaml.SafeLoader) -> list[Any]:
    documents = []
    while loader.check_data():
        documents.append(loader.get_data())
    return documents


class _RepeatedKeysLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, noting each key given twice in one mapping (PyYAML keeps the later value
    silently; a merge key `<<:` overriding is not a repeat)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.repeated_keys: list[tuple[Any, int, int]] = []  # key, first line, repeat line

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_lines = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in first_lines:
                    self.repeated_keys.append((key, first_lines[key], line))
                else:
                    first_lines[key] = line
        return super().construct_mapping(node, deep)


def expands_beyond(content: Any, limit: int) -> bool:
    """Whether content, its shared (aliased) parts counted each time they are reached, holds more than limit
    values; stops counting there."""
    pending, seen = [content], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, dict):
            pending += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            pending += value
    return False


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own text spans lines, with a caret drawing)."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return f"invalid YAML: {' '.join(str(e).split())}"
    what = " ".join(filter(None, [getattr(e, "context", None), getattr(e, "problem", None)]))
    return f"invalid YAML: {what} (line {mark.line + 1}, column {mark.column + 1})"


def parse_config(raw: Any, source: str | None = None, strict: bool = False) -> MergeConfig:
    """Validate a config given as a dict; raise ConfigError listing every problem found. Parameters the
    method does not use are ignored with a warning, as mergekit ignores them, or refused when strict."""
    if not isinstance(raw, dict):
        raise ConfigError(["the config must be a mapping of keys (merge_method, models or slices, ...)"], source)
    problems: list[str] = []
    for where, unknown in _unknown_keys(raw, source or "config"):
        if strict:
            problems.append(f"{where}: unknown key(s) {unknown} (mergekit ignores them; --strict refuses them)")
        else:
            warnings.warn(f"{where}: ignoring unknown key(s) {unknown} (mergekit ignores them too)")
    method = method_of(raw, problems)
    cfg = MergeConfig(method=method, slices=[], raw=raw, parameters=_params_dict(raw, "", problems))
    cfg.base_model = _model_ref(raw.get("base_model"), "base_model", problems, optional=True)
    cfg.dtype = _dtype(raw, "dtype", problems)
    cfg.out_dtype = _dtype(raw, "out_dtype", problems)
    cfg.tokenizer = _tokenizer(raw, problems)
    cfg.chat_template = _chat_template(raw, problems)
    forms = [k for k in ("models", "slices", "modules") if raw.get(k)]
    if len(forms) != 1:
        problems.append("exactly one of 'models', 'slices' or 'modules' must be given"
                        + (f" (found {forms})" if forms else ""))
    elif forms[0] == "models":
        cfg.slices = [_models_slice(raw["models"], cfg.base_model, problems)]
    elif forms[0] == "slices":
        cfg.slices = _slices(raw["slices"], problems)
    else:
        cfg.modules, cfg.slices = _modules(raw["modules"], cfg.base_model, problems)
    _check_parameters(cfg, problems, strict)
    _check_side_inputs(cfg, problems)
    _warn_repeated_models(cfg)
    if method:
        for s in cfg.slices:
            problems += method.input_problems([src.model for src in s.sources], cfg.slice_base(s), s.where)
    if problems:
        raise ConfigError(problems, source, raw)
    return cfg


def method_of(raw: dict, problems: list[str]) -> MergeMethod | None:
    """The config's merge method (specialised by its parameters where it wraps another), or None with the
    problem appended: missing, not a name, unknown."""
    name = raw.get("merge_method")
    if name is None:
        problems.append("'merge_method' is missing")
    elif not isinstance(name, str):
        problems.append(f"merge_method: expected a method name, got {name!r}")
    elif name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1, cutoff=0.75)
        hint = f"did you mean '{close[0]}'? " if close else ""
        problems.append(f"unknown merge_method '{name}' ({hint}supported: {', '.join(sorted(REGISTRY))})")
    method = REGISTRY.get(name) if isinstance(name, str) else None
    if method is not None and method.specialize is not None:
        params = raw.get("parameters")
        try:
            return method.specialize(params if isinstance(params, dict) else {}, REGISTRY)
        except ValueError as e:
            problems.append(str(e))
            return None
    return method


def _model_ref(ref: Any, where: str, problems: list[str], optional: bool = False) -> str | None:
    if ref is None and optional:
        return None
    if isinstance(ref, dict) and "model" in ref:
        if ref.get("override_architecture") is not None:
            problems.append(f"{where}: override_architecture is not supported")
            return None
        ref = _reference_text(ref)
    if not isinstance(ref, str) or not ref:
        problems.append(f"{where}: expected a model path, got {ref!r}")
        return None
    if not _is_path(ref, where, problems):
        return None
    if "+" in ref and not all(ref.split("+")) or ref.count("+") > 1:
        problems.append(f"{where}: '{ref}': expected a model folder or BASE+ADAPTER (a LoRA adapter or "
                        "merge_engine patch folder)")
    elif any(part.count("@") > 1 for part in ref.split("+")):  # (mergekit refuses them too)
        problems.append(f"{where}: '{ref}': expected at most one @ (MODEL@REVISION) in each part")
    return ref


def _reference_text(ref: dict) -> Any:
    """mergekit's mapping form of a reference, {model: PATH, lora: PATH} (each PATH also {path, revision}), as the
    text it stands for, PATH[@REVISION][+LORA]; a part that is neither is returned as given, to be refused."""
    def text(path: Any) -> Any:
        if isinstance(path, dict) and "path" in path:
            return path["path"] if path.get("revision") is None else f"{path['path']}@{path['revision']}"
        return path
    model, lora = text(ref["model"]), text(ref.get("lora"))
    if lora is None:
        return model
    return f"{model}+{lora}" if isinstance(model, str) and isinstance(lora, str) else ref


def _is_path(text: str, where: str, problems: list[str]) -> bool:
    """Whether text can name a file; else the problem appended."""
    if not is_file_name(text):
        problems.append(f"{where}: {text!r} cannot be a path (a NUL or a lone surrogate, which no file name holds)")
        return False
    return True


def _dtype(raw: dict, key: str, problems: list[str]) -> torch.dtype | None:
    name = raw.get(key)
    if name is None or name == "":  # mergekit's dtype_from_name takes an empty name as none
        return None
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        problems.append(f"{key}: unknown dtype '{raw[key]}' (use one of {', '.join(DTYPES)})")
    return DTYPES.get(name)


def _tokenizer(raw: dict, problems: list[str]) -> TokenizerSpec | None:
    """`tokenizer_source: SOURCE` or `tokenizer: {source, tokens, pad_to_multiple_of}` (not both)."""
    short, full = raw.get("tokenizer_source"), raw.get("tokenizer")
    if short is not None and full is not None:
        problems.append("give 'tokenizer_source' or 'tokenizer', not both")
        return None
    if short is not None:
        source = _vocabulary_source(short, "tokenizer_source", problems)
        return TokenizerSpec(source) if source else None
    if full is None:
        return None
    if not isinstance(full, dict):
        problems.append(f"tokenizer: expected {{source, tokens, pad_to_multiple_of}}, got {full!r}")
        return None
    source = _vocabulary_source(full.get("source", "union"), "tokenizer.source", problems)
    given = full.get("pad_to_multiple_of")
    pad = None if given is None else lax_int(given)  # numbers as mergekit's schema takes them ("8", 8.0)
    if given is not None and not (pad is not None and 0 <= pad <= MAX_PAD_MULTIPLE):
        problems.append(f"tokenizer.pad_to_multiple_of: expected an integer from 0 (no padding) to {MAX_PAD_MULTIPLE} (it "
                        f"pads the vocabulary up to a multiple of it), got {given!r}")
    pad = pad or None  # 0 pads nothing, as in mergekit
    tokens = full.get("tokens") or {}
    if not isinstance(tokens, dict):
        problems.append(f"tokenizer.tokens: expected a mapping of token -> {{source, force}}, got {tokens!r}")
        tokens = {}
    unwritable = [tok for tok in tokens if not is_text(str(tok))]  # the tokenizer library refuses to add one
    if unwritable:
        problems.append(f"tokenizer.tokens: {', '.join(map(repr, unwritable))} is not text (a lone surrogate escape, "
                        "\\ud800-\\udfff)")
    settings = {str(tok): _token_setting(value, f"tokenizer.tokens[{tok!r}]", problems)
                for tok, value in tokens.items() if tok not in unwritable}
    return TokenizerSpec(source, settings, pad) if source else None


def _vocabulary_source(value: Any, where: str, problems: list[str]) -> str | None:
    return value if value in ("union", "base") else _model_ref(value, where, problems)


def _unknown_keys(raw: dict, top: str) -> list[tuple[str, list]]:
    """(where, keys) for the keys mergekit's schema drops, at the top level, in each module of `modules:` and in
    `tokenizer:` (its tokens and their sources): ignored with a warning, as mergekit ignores them, or refused by
    --strict."""
    found = [(top, set(raw) - _KNOWN_KEYS)]
    modules = raw.get("modules")
    for name, module in modules.items() if isinstance(modules, dict) else ():
        if isinstance(module, dict):
            found.append((f"modules.{name}", set(module) - {"models", "slices", "parameters"}))
    full = raw.get("tokenizer")
    if isinstance(full, dict):
        found.append(("tokenizer", set(full) - {"source", "tokens", "pad_to_multiple_of"}))
        tokens = full.get("tokens")
        for tok, setting in tokens.items() if isinstance(tokens, dict) else ():
            where = f"tokenizer.tokens[{tok!r}]"
            if isinstance(setting, dict):
                found.append((where, set(setting) - {"source", "force"}))
                source = setting.get("source")
                kind = source.get("kind") if isinstance(source, dict) else None
                if kind in _TOKEN_SOURCE_KEYS:
                    found.append((f"{where}.source", set(source) - _TOKEN_SOURCE_KEYS[kind]))
    return [(where, sorted(keys, key=str)) for where, keys in found if keys]  # YAML keys may be numbers too


_TOKEN_SOURCE_KEYS = {"zero": {"kind"}, "model_token": {"kind", "model", "token_id", "token"}}


def _token_setting(value: Any, where: str, problems: list[str]) -> TokenSetting:
    if not isinstance(value, dict):
        problems.append(f"{where}: expected {{source, force}}, got {value!r}")
        return TokenSetting()
    given = value.get("force", False)
    force = lax_bool(given)  # as mergekit's schema takes it: 1 and "yes" are true
    if force is None:
        problems.append(f"{where}.force: expected true or false, got {given!r}")
    source = _token_source(value.get("source"), f"{where}.source", problems)
    if force and source is None:
        problems.append(f"{where}: force needs a source to take the embedding from")
    return TokenSetting(source, bool(force))


def _token_source(value: Any, where: str, problems: list[str]) -> TokenSource | None:
    """A model path, {kind: zero}, or {kind: model_token, model, token_id | token}."""
    if value is None:
        return None
    if isinstance(value, str) or isinstance(value, dict) and "kind" not in value and "model" in value:
        model = _model_ref(value, where, problems)  # (a dict: a reference in mergekit's mapping form)
        return TokenSource("model", model) if model else None
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind == "zero":
        return TokenSource("zero")
    if kind == "model_token":
        model = _model_ref(value.get("model"), f"{where}.model", problems)
        given, token = value.get("token_id"), value.get("token")
        token_id = None if given is None else lax_int(given)  # as mergekit's schema takes it: "5" and 5.0 are 5
        if (given is None) == (token is None):
            problems.append(f"{where}: give one of token_id or token")
        elif given is not None and not (token_id is not None and token_id >= 0):
            problems.append(f"{where}.token_id: expected a non-negative integer, got {given!r}")
        return TokenSource("model_token", model, token_id, None if token is None else str(token))
    problems.append(f"{where}: expected a model path, {{kind: zero}} or {{kind: model_token, model, token_id | "
                    f"token}}, got {value!r}")
    return None


def _chat_template(raw: dict, problems: list[str]) -> str | None:
    template = raw.get("chat_template")
    if template is None:
        return None
    from merge_engine.chat_templates import BUILT_IN
    if not isinstance(template, str) or not (template == "auto" or template in BUILT_IN
                                             or (len(template) >= 20 and "{" in template)):
        problems.append(f"chat_template: expected 'auto', one of {', '.join(BUILT_IN)} or a Jinja template, "
                        f"got {template!r}")
        return None
    return template


def _models_slice(models: Any, base: str | None, problems: list[str], key: str = "models") -> Slice:
    sources = []
    for i, entry in enumerate(models if isinstance(models, list) else []):
        if not isinstance(entry, dict) or "model" not in entry:
            problems.append(f"{key}[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}")
            continue
        model = _model_ref(entry["model"], f"{key}[{i}].model", problems)
        if model:
            sources.append(Source(model, None, _params_dict(entry, f"{key}[{i}]", problems),
                                  _side_paths(entry, f"{key}[{i}]", problems)))
    if not isinstance(models, list):
        problems.append(f"{key}: expected a list, got {models!r}")
    if base and base not in [s.model for s in sources]:
        sources.append(Source(base, None, None))
    return Slice(sources, where=key)


def _slices(slices: Any, problems: list[str], key: str = "slices") -> list[Slice]:
    if not isinstance(slices, list):
        problems.append(f"{key}: expected a list, got {slices!r}")
        return []
    out = []
    for i, s in enumerate(slices):
        where = f"{key}[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
            problems.append(f"{where}: expected {{sources: [{{model, layer_range}}, ...]}}")
            continue
        sources = []
        for j, src in enumerate(s["sources"]):
            swhere = f"{where}.sources[{j}]"
            model = _model_ref(src.get("model") if isinstance(src, dict) else None, f"{swhere}.model", problems)
            given = src.get("layer_range") if isinstance(src, dict) else None
            # numbers as mergekit's schema takes them: 2.0 and "2" are layer 2
            lr = [lax_int(x) for x in given] if isinstance(given, list) and len(given) == 2 else None
            if not (lr and all(x is not None and x >= 0 for x in lr) and lr[0] < lr[1]):
                problems.append(f"{swhere}.layer_range: expected [start, end) with 0 <= start < end, got {given!r}")
                lr = None
            if model:
                sources.append(Source(model, tuple(lr) if lr else None, _params_dict(src, swhere, problems),
                                      _side_paths(src, swhere, problems)))
        lengths = {src.layer_range[1] - src.layer_range[0] for src in sources if src.layer_range}
        if len(lengths) > 1:
            problems.append(f"{where}: all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        base = _model_ref(s.get("base_model"), f"{where}.base_model", problems, optional=True)
        out.append(Slice(sources, base, _params_dict(s, where, problems), where))
    return out


def _modules(modules: Any, base: str | None, problems: list[str]) -> tuple[list[str], list[Slice]]:
    """`modules: {NAME: {models | slices, parameters}}`: the module names, and every module's slices in order."""
    if not isinstance(modules, dict):
        problems.append(f"modules: expected a mapping of module name -> {{models | slices, parameters}}, got "
                        f"{reprlib.repr(modules)}")
        return [], []
    names, slices = [], []
    for name, module in modules.items():
        key = f"modules.{name}"
        if not isinstance(name, str) or not name:
            problems.append(f"modules: module names are strings (text_decoder, vision_tower, ...), got {name!r}")
            continue
        if not isinstance(module, dict) or bool(module.get("models")) == bool(module.get("slices")):
            problems.append(f"{key}: expected exactly one of 'models' or 'slices' (and optionally 'parameters')")
            continue
        parameters = _params_dict(module, key, problems)
        own = ([_models_slice(module["models"], base, problems, f"{key}.models")] if module.get("models")
               else _slices(module["slices"], problems, f"{key}.slices"))
        for s in own:
            s.module, s.module_parameters = name, parameters
        names.append(name)
        slices += own
    return names, slices


def _params_dict(entry: dict, where: str, problems: list[str]) -> dict | None:
    params = entry.get("parameters")
    key = f"{where}.parameters" if where else "parameters"
    if params is not None and not isinstance(params, dict):
        problems.append(f"{key}: expected a mapping, got {params!r}")
        return None
    names = [name for name in params or {} if not isinstance(name, str)]
    if names:  # mergekit's schema takes string names only (a bare 5: is an int to YAML)
        problems.append(f"{key}: parameter names must be strings, got {', '.join(map(repr, names))}")
        return {name: value for name, value in params.items() if isinstance(name, str)}
    return params


def _side_paths(entry: dict, where: str, problems: list[str]) -> dict[str, str]:
    paths = {}
    for key in SIDE_INPUT_KEYS:
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value:
            if _is_path(value, f"{where}.{key}", problems):
                paths[key] = value
        else:
            problems.append(f"{where}.{key}: expected a folder path, got {value!r}")
    return paths


def _check_side_inputs(cfg: MergeConfig, problems: list[str]) -> None:
    """Every model a method weights must name the side inputs it needs; unused ones are ignored."""
    if not cfg.method:
        return
    needed, unused = cfg.method.side_inputs, set()
    for s in cfg.slices:
        for src in s.sources:
            unused.update(k for k in src.side if k not in needed)
            if cfg.method.base != "ignored" and src.model == cfg.slice_base(s):
                continue
            for kind in needed:
                if kind not in src.side:
                    problems.append(f"{s.where}[{src.model}]: merge method '{cfg.method.name}' needs '{kind}: PATH' "
                                    f"for this model (the folder written by `{WRITTEN_BY[kind]}`)")
    if unused:
        warnings.warn(f"{sorted(unused)} given but not used by merge method '{cfg.method.name}'; ignored")


def parameter_scopes(cfg: MergeConfig) -> list[tuple[str, dict | None]]:
    """(where, parameters) of every scope of the config: its own, each module's, each slice's and each slice
    source's."""
    scopes = [("parameters", cfg.parameters)]
    modules = {s.module: s.module_parameters for s in cfg.slices if s.module is not None}
    scopes += [(f"modules.{name}.parameters", parameters) for name, parameters in modules.items()]
    for s in cfg.slices:
        scopes.append((f"{s.where}.parameters", s.parameters))
        scopes += [(f"{s.where}[{src.model}].parameters", src.parameters) for src in s.sources]
    return scopes


def _check_parameters(cfg: MergeConfig, problems: list[str], strict: bool = False) -> None:
    """Check every parameter setting's structure, and each value against the method's spec."""
    specs: dict[str, ParamSpec] = {p.name: p for p in cfg.method.params} if cfg.method else {}
    ignored = set()
    for where, params in parameter_scopes(cfg):
        for name, setting in (params or {}).items():
            shape = setting_shape_problem(setting)
            if shape:
                problems.append(f"{where}.{name}: {shape}")
                continue
            extra = extra_keys(setting)
            if extra:
                ignoring = (f"{where}.{name}: {{filter, value}} entries take no {', '.join(extra)}; an entry without "
                            "a filter matches every tensor")
                if strict:
                    problems.append(f"{ignoring} (--strict refuses it)")
                else:
                    warnings.warn(f"{ignoring}: ignored, as mergekit does (--strict refuses it)")
            if holds_empty_list(setting):
                empty = f"{where}.{name}: an empty list sets nothing"
                if strict:
                    problems.append(f"{empty} (--strict refuses it)")
                else:
                    warnings.warn(f"{empty}: the enclosing parameters' value (or the default) applies, as in "
                                  "mergekit (--strict refuses it)")
            if name not in specs:
                ignored.add(name)
            else:
                for leaf in setting_leaves(setting):
                    try:
                        value = specs[name].validate(leaf)
                    except ValueError as e:
                        problems.append(f"{where}.{name}: {e}")
                        continue
                    if is_boolean_number(specs[name], leaf):
                        boolean = f"{where}.{name}: {str(leaf).lower()} is a boolean where a number belongs"
                        if strict:
                            problems.append(f"{boolean} (--strict refuses it)")
                        else:
                            warnings.warn(f"{boolean}: taken as {value}, as mergekit does (--strict refuses it)")
                        continue
                    caution = specs[name].caution and specs[name].caution(value)
                    if caution:
                        warnings.warn(f"{where}.{name} = {value} {caution}")
    _check_required(cfg, problems)
    if ignored and cfg.method:
        unused = "; ".join(_unused_parameter(name, specs, cfg.method.name) for name in sorted(ignored))
        if strict:
            problems.append(f"{unused} (--strict refuses unused parameters)")
        else:
            warnings.warn(f"{unused}: ignored, as mergekit does (--strict refuses it)")


def _warn_repeated_models(cfg: MergeConfig) -> None:
    for s in cfg.slices:
        models = [src.model for src in s.sources]
        repeated = sorted({m for m in models if models.count(m) > 1})
        if repeated:
            warnings.warn(f"{s.where}: {', '.join(repeated)} listed more than once: each listing counts as a model "
                          "(mergekit 0.1.5 refuses this: Duplicate merge inputs)")


def _unused_parameter(name: str, specs: dict[str, ParamSpec], method: str) -> str:
    """Names a parameter the method does not use, with the closest one it does (a likely typo)."""
    close = difflib.get_close_matches(name, specs, n=1, cutoff=0.75)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"parameter '{name}' is not used by merge method '{method}'{hint}"


def _check_required(cfg: MergeConfig, problems: list[str]) -> None:
    """Required parameters given nowhere in a tensor's scope chain (filters are checked per tensor later)."""
    if not cfg.method:
        return
    for s in cfg.slices:
        where = s.where
        chain = [scope or {} for scope in cfg.scopes(s)]
        for spec in (p for p in cfg.method.params if p.required):
            if spec.scope == Scope.SHARED:
                if not any(gives(scope, spec.name) for scope in chain):
                    problems.append(f"{where}: merge method '{cfg.method.name}' needs parameter '{spec.name}'")
                continue
            for src in s.sources:
                if spec.scope == Scope.NON_BASE and src.model == cfg.slice_base(s):
                    continue
                if not any(gives(scope, spec.name) for scope in [src.parameters or {}, *chain]):
                    problems.append(f"{where}[{src.model}]: merge method '{cfg.method.name}' needs "
                                    f"parameter '{spec.name}' for this model")
