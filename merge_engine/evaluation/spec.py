"""The Evaluator interface a merge search calls, and building one from a config mapping, e.g.
{kind: multiple_choice, data: val.jsonl, normalize: chars}: every problem of the mapping is reported at once,
naming its key."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from merge_engine.errors import ConfigError
from merge_engine.evaluation.lm_eval_tasks import LmEvalTasks
from merge_engine.evaluation.multiple_choice import NORMALIZE, MultipleChoice
from merge_engine.evaluation.perplexity import Perplexity
from merge_engine.io.untrusted import is_file_name, is_int


class Evaluator(Protocol):
    name: str  # what is scored, on what: shown in the progress display and the trials table
    direction: str  # "maximize" or "minimize"

    def __call__(self, model: torch.nn.Module) -> float:
        """The score of the model as it is now, computed on the model's device."""

    def tokens(self) -> int:
        """How many tokens one call feeds the model (known before any weights are read)."""

    def check_model(self, config) -> None:
        """Refuse, before any weights are read, a model (its transformers config) the data does not fit."""

    def memory_bytes(self, model: torch.nn.Module) -> int:
        """The most memory one call allocates on the model's device beside its weights: an estimate from the
        model's class, config and dtype (evaluation.memory), so the model may be on the meta device (known before
        any weights are read)."""


@dataclass(frozen=True)
class Key:
    accepts: Callable[[object], bool]
    expected: str  # "must be <expected>"
    required: bool = False


def _is_count(v) -> bool:
    return is_int(v) and v >= 1


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_limit(v) -> bool:  # lm_eval's limit: a number of examples, or a fraction of them
    return v is None or _is_count(v) or (isinstance(v, float) and 0 < v < 1)


def _is_path(v) -> bool:
    return isinstance(v, str) and v != "" and is_file_name(v)


DATA = Key(_is_path, "a file path", required=True)
BATCH_SIZE = Key(_is_count, "a positive integer")
SCHEMAS: dict[str, dict[str, Key]] = {
    "multiple_choice": {"data": DATA, "normalize": Key(lambda v: v in NORMALIZE, f"one of {', '.join(NORMALIZE)}"),
                        "batch_size": BATCH_SIZE, "delimiter": Key(_is_str, "a string"),
                        "max_length": Key(lambda v: v is None or _is_count(v), "a positive integer or null")},
    "perplexity": {"data": DATA, "max_length": Key(lambda v: is_int(v) and v >= 2, "an integer of at least 2"),
                   "batch_size": BATCH_SIZE},
    "lm_eval": {"tasks": Key(lambda v: isinstance(v, list) and bool(v) and all(map(_is_str, v)),
                             "a non-empty list of task names", required=True),
                "include_path": Key(lambda v: v is None or _is_path(v), "a folder path or null"),
                "metric": Key(_is_str, "a metric name (e.g. acc)"), "batch_size": BATCH_SIZE,
                "limit": Key(_is_limit, "null, a positive integer or a fraction between 0 and 1")},
}
BUILDERS = {"multiple_choice": MultipleChoice, "perplexity": Perplexity, "lm_eval": LmEvalTasks}
FIRST_ARGUMENT = {"multiple_choice": "data", "perplexity": "data", "lm_eval": "tasks"}  # the rest are keywords
PATH_KEYS = ("data", "include_path")  # relative to base_dir


def spec_path(base_dir: str, value: str) -> str:
    """A PATH_KEYS value as the evaluator reads it: ~ expanded, relative to base_dir (an absolute path stays)."""
    return os.path.join(base_dir, os.path.expanduser(value))


def evaluator_from_spec(spec: Mapping, tokenizer, where: str, base_dir: str = ".") -> Evaluator:
    """The evaluator a config mapping describes (where: its place in the config, e.g. "search.objective", for
    messages). Raises ConfigError listing every problem of the mapping, or of its data file."""
    problems = spec_problems(spec, where)
    if problems:
        raise ConfigError(problems, where)
    options = {k: v for k, v in spec.items() if k != "kind"}
    for key in PATH_KEYS:
        if options.get(key) is not None:
            options[key] = spec_path(base_dir, options[key])
    first = options.pop(FIRST_ARGUMENT[spec["kind"]])
    return BUILDERS[spec["kind"]](first, tokenizer, **options)


def spec_problems(spec: object, where: str) -> list[str]:
    if not isinstance(spec, Mapping):
        return [f"{where} must be a mapping with a kind ({', '.join(SCHEMAS)}), got {spec!r}"]
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMAS:  # (a list or mapping cannot be looked up)
        got = "it is missing" if "kind" not in spec else f"got {kind!r}"
        return [f"{where}.kind must be one of {', '.join(SCHEMAS)}, {got}"]
    schema = SCHEMAS[kind]
    problems = [f"{where}.{key} is not a key of a {kind} objective (known: kind, {', '.join(schema)})"
                for key in spec if key != "kind" and key not in schema]
    for key, rule in schema.items():
        if key not in spec:
            problems += [f"{where}.{key} is missing: a {kind} objective needs {rule.expected}"] if rule.required else []
        elif not rule.accepts(spec[key]):
            problems.append(f"{where}.{key} must be {rule.expected}, got {spec[key]!r}")
    return problems
