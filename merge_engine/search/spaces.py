"""Search spaces inside a mergekit config, and the plain configs they stand for.

A parameter setting may be a space wherever it may be a value (global, per slice, per model, inside a
{filter, value} entry):
    {search: [low, high]}                  a number in [low, high] (an integer for integer parameters)
    {search: [low, high], log: true}       the same, sampled on a log scale (weights, lambda)
    {search: [low, high], knots: K}        a per-layer gradient: K values in [low, high], the setting's list
    {choice: [a, b, ...]}                  one of these values
Each space gets a name from where it is (`density`, `models[1].weight`, `slices[0].sources[2].t`,
`modules.vision_tower.models[0].weight`, `t[filter=self_attn]`); a gradient's knots are NAME[0], NAME[1], ... in the sampler's parameters.
"""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from typing import Any

from merge_engine.config import MergeConfig, method_of, parse_config
from merge_engine.errors import ConfigError
from merge_engine.io.untrusted import is_finite_number
from merge_engine.methods import REGISTRY
from merge_engine.parameters import ParamSpec, Scope, is_boolean_number, is_scalar

SEARCH_KEY = "search"  # the config's own section of search settings; not part of the merge config
_SPACE_KEYS = {"search", "log", "knots", "choice"}
MAX_KNOTS = 1024  # a gradient's knots are spread over the layers: more knots than layers add nothing


@dataclass(frozen=True)
class Space:
    name: str  # the sampler's parameter name (knots: NAME[i])
    path: tuple  # keys from the config's root to the setting it replaces
    spec: ParamSpec
    low: float | None = None
    high: float | None = None
    log: bool = False
    knots: int = 0  # 0: one value; K: a gradient of K values
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The setting this space takes in an optuna trial."""
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        suggest = trial.suggest_int if self.spec.kind is int else trial.suggest_float
        if not self.knots:
            return suggest(self.name, self.low, self.high, log=self.log)
        return [suggest(f"{self.name}[{k}]", self.low, self.high, log=self.log) for k in range(self.knots)]

    def setting(self, params: dict[str, Any]) -> Any:
        """The setting for a finished trial's parameters."""
        if self.knots:
            return [params[f"{self.name}[{k}]"] for k in range(self.knots)]
        return params[self.name]

    def start(self) -> dict[str, Any]:
        """Sampler parameters of the space's middle (log-middle; the first choice): the search's first trial."""
        if self.choices:
            return {self.name: self.choices[0]}
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        mid = round(mid) if self.spec.kind is int else mid
        names = [f"{self.name}[{k}]" for k in range(self.knots)] if self.knots else [self.name]
        return dict.fromkeys(names, mid)

    def elsewhere(self) -> dict[str, Any]:
        """Sampler parameters off the start (the second choice; the low end, or the high one where the middle
        rounds to the low): what moving this space alone gives."""
        if self.choices:
            return {self.name: self.choices[1]}
        mid = next(iter(self.start().values()))
        names = [f"{self.name}[{k}]" for k in range(self.knots)] if self.knots else [self.name]
        return dict.fromkeys(names, self.low if mid != self.low else self.high)


@dataclass
class SearchConfig:
    """A SEARCH.yml: the merge config with spaces, its spaces, and its `search:` settings."""

    raw: dict  # without the `search:` section
    spaces: list[Space]
    settings: dict  # the `search:` section
    source: str | None = None

    def concrete(self, params: dict[str, Any]) -> dict:
        """The plain mergekit config a trial's parameters make (every space replaced by its setting)."""
        out = copy.deepcopy(self.raw)
        for space in self.spaces:
            *parents, last = space.path
            node = out
            for key in parents:
                node = node[key]
            node[last] = space.setting(params)
        return out

    def start(self) -> dict[str, Any]:
        return {k: v for space in self.spaces for k, v in space.start().items()}

    def merge_config(self, params: dict[str, Any]) -> MergeConfig:
        return parse_config(self.concrete(params), self.source)


def is_space(setting: Any) -> bool:
    """A search space, or a mapping meant as one: any mapping but a {filter, value} entry, whole or not (a misspelt
    space key then gets the space's own message, not the merge config's)."""
    return isinstance(setting, dict) and not {"filter", "value"} & set(setting)


def parse_search_config(raw: Any, source: str | None = None) -> SearchConfig:
    """Split a SEARCH.yml mapping into its merge config, spaces and settings; ConfigError listing every
    problem (spaces on parameters the method lacks, bad ranges, values the parameter refuses, a merge config
    that is invalid once the spaces take their middle values)."""
    if not isinstance(raw, dict):
        raise ConfigError(["a search config is a mapping: a merge config plus a `search:` section"], source)
    keys = [k for k in raw if not isinstance(k, str)]
    if keys:
        raise ConfigError([f"{k!r}: a config's keys are names (strings)" for k in keys], source)
    settings = raw.get(SEARCH_KEY) or {}
    merge_raw = {k: v for k, v in raw.items() if k != SEARCH_KEY}
    problems = [] if isinstance(settings, dict) else [f"{SEARCH_KEY}: must be a mapping, got {settings!r}"]
    name = merge_raw.get("merge_method")
    method = REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        method_of(merge_raw, problems)  # names the missing, mistyped or unknown method
    specs = {p.name: p for p in method.params} if method else {}
    if method and method.specialize:  # the wrapped method's parameters too (bmm's anchor, regmean's fallback)
        try:
            specs = {p.name: p for p in method.specialize(merge_raw.get("parameters") or {}, REGISTRY).params}
        except ValueError:
            pass  # parse_config below says what is wrong
    spaces, named = [], {}
    for path, name, setting in _settings(merge_raw):
        if is_space(setting):
            space = _space(name, path, setting, specs, method, problems)
            idle = space and _changes_nothing(merge_raw, path, space.spec, method.name)
            if idle:
                problems.append(idle)
            elif space and name in named:  # two {filter, value} entries of one parameter with the same filter
                problems.append(f"{_where(path)}: a second search space named {name} (the first is at "
                                f"{_where(named[name])}): give each filter's entry one space")
            elif space:
                spaces.append(space)
                named[name] = path
    if not spaces and not problems:
        problems.append("no search space: give some parameter a {search: [low, high]} or {choice: [...]} setting")
    if problems:
        raise ConfigError(problems, source)
    config = SearchConfig(merge_raw, spaces, settings if isinstance(settings, dict) else {}, source)
    config.merge_config(config.start())  # everything else about the merge config, checked now
    return config


def _settings(raw: dict):
    """(path, name, setting) of every parameter setting of a config, and of each {filter, value} entry's value."""
    scopes = [(("parameters",), ""), *_entry_scopes(raw, ())]
    modules = raw.get("modules")
    for module, entry in modules.items() if isinstance(modules, dict) else ():
        if isinstance(entry, dict):
            scopes += [(("modules", module, "parameters"), f"modules.{module}."), *_entry_scopes(entry, ("modules", module))]
    for scope, prefix in scopes:
        params = _at(raw, scope)
        for param, setting in (params.items() if isinstance(params, dict) else ()):
            yield (*scope, param), f"{prefix}{param}", setting
            for k, entry in enumerate(setting if isinstance(setting, list) else []):
                if isinstance(entry, dict) and "value" in entry:
                    yield (*scope, param, k, "value"), f"{prefix}{param}[filter={entry.get('filter') or '*'}]", entry["value"]


def _entry_scopes(raw: dict, at: tuple) -> list[tuple[tuple, str]]:
    """(path, name prefix) of the parameters of each models: entry, slice and slice source of raw (the config, or a
    module of its modules: at `at`)."""
    scopes = []
    for key in ("models", "slices"):
        entries = raw.get(key)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(entry, dict):
                continue
            where = _where((*at, key, i))
            scopes.append(((*at, key, i, "parameters"), f"{where}."))
            sources = entry.get("sources")
            scopes += [((*at, key, i, "sources", j, "parameters"), f"{where}.sources[{j}].")
                       for j in range(len(sources if isinstance(sources, list) else []))]
    return scopes


def _at(raw: Any, path: tuple) -> Any:
    for key in path:
        try:
            raw = raw[key]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _space(name: str, path: tuple, setting: dict, specs: dict[str, ParamSpec], method, problems: list[str]) -> Space | None:
    param = path[-1] if path[-1] != "value" else path[-3]
    where = _where(path)
    if method is None:
        return None  # parse_config names the unknown method
    spec = specs.get(param)
    if spec is None:
        problems.append(f"{where}: a search space on '{param}', which merge method '{method.name}' does not have")
        return None
    unknown = sorted(set(setting) - _SPACE_KEYS, key=str)
    if unknown or ("search" in setting) == ("choice" in setting):
        close = [f"'{k}' (did you mean '{c[0]}'?)" for k in unknown
                 for c in [difflib.get_close_matches(str(k), _SPACE_KEYS, n=1, cutoff=0.6)] if c]
        problems.append(f"{where}: a search space is {{search: [low, high]}} (with log: true or knots: K) or "
                        f"{{choice: [...]}}, got {setting!r}" + (f": {', '.join(close)}" if close else ""))
        return None
    if "choice" in setting:
        return _choice(name, path, spec, setting["choice"], where, problems)
    return _range(name, path, spec, setting, where, problems)


def _changes_nothing(raw: dict, path: tuple, spec: ParamSpec, method: str) -> str | None:
    """Why a space at path would change no tensor, if it would not: a parameter the method reads once for the
    whole merge, set for one model; a parameter of the other models, set for the base (mergekit ignores both)."""
    entry = next((path[:k + 2] for k in range(len(path) - 2) if path[k] in ("models", "sources")
                  and isinstance(path[k + 1], int) and path[k + 2] == "parameters"), None)  # a model's own settings
    if entry is None:
        return None
    if spec.scope == Scope.SHARED:
        return (f"{_where(path)}: merge method '{method}' reads '{spec.name}' once for the whole merge (a config's, "
                f"a module's or a slice's parameters), not per model: this space would change nothing")
    model = _at(raw, entry)
    if spec.scope == Scope.NON_BASE and isinstance(model, dict) and model.get("model") == raw.get("base_model"):
        return (f"{_where(path)}: merge method '{method}' reads '{spec.name}' for the models other than the base: "
                "this space would change nothing")
    return None


def _where(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _choice(name, path, spec, choices, where, problems) -> Space | None:
    if not isinstance(choices, list) or len(choices) < 2 or not all(is_scalar(c) for c in choices):
        problems.append(f"{where}.choice: a list of at least two values, got {choices!r}")
        return None
    if any(is_boolean_number(spec, c) for c in choices):
        problems.append(f"{where}.choice: '{spec.name}' is a number; true and false are not, got {choices!r}")
        return None
    try:
        values = tuple(spec.validate(c) for c in choices)
    except ValueError as e:
        problems.append(f"{where}.choice: {e}")
        return None
    if _cautioned(spec, values, f"{where}.choice", problems):
        return None
    repeated = [v for k, v in enumerate(values) if v in values[:k]]  # as the parameter reads them: "yes" is true
    if repeated:
        problems.append(f"{where}.choice: {repeated[0]!r} is given twice (as '{spec.name}' reads the values "
                        f"{choices!r}): its trials would merge alike")
        return None
    return Space(name, path, spec, choices=values)


def _cautioned(spec, values, where, problems) -> bool:
    """A space reaching values a config may hold only with a warning (a density above 1 merges as 1; t outside
    [0, 1] extrapolates) is refused: each trial there would warn, and many would merge alike."""
    cautions = [f"'{spec.name}' = {v} {spec.caution(v)}" for v in values if spec.caution and spec.caution(v)]
    if cautions:
        problems.append(f"{where}: {'; '.join(cautions)}; a search space stays within the values that merge "
                        "without a warning")
    return bool(cautions)


def _range(name, path, spec, setting, where, problems) -> Space | None:
    bounds, log, knots = setting["search"], setting.get("log", False), setting.get("knots", 0)
    numeric = spec.kind in (int, float)
    if not numeric:
        problems.append(f"{where}: '{spec.name}' is a {spec.kind.__name__}; search it with {{choice: [...]}}")
        return None
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(map(is_finite_number, bounds))
            or not bounds[0] < bounds[1]):
        problems.append(f"{where}.search: [low, high] with finite numbers low < high, got {bounds!r}")
        return None
    if not isinstance(log, bool) or (log and bounds[0] <= 0):
        problems.append(f"{where}.log: true needs low > 0 (and log is true or false), got log={log!r}, low={bounds[0]}")
        return None
    if not isinstance(knots, int) or isinstance(knots, bool) or knots == 1 or knots < 0:
        problems.append(f"{where}.knots: an integer of at least 2 (a gradient's values), got {knots!r}")
        return None
    if knots > MAX_KNOTS:
        problems.append(f"{where}.knots: at most {MAX_KNOTS} (a gradient's values are spread over the layers), "
                        f"got {knots}")
        return None
    try:
        low, high = (spec.validate(b) for b in bounds)
    except ValueError as e:
        problems.append(f"{where}.search: {e}")
        return None
    if _cautioned(spec, (low, high), f"{where}.search", problems):
        return None
    return Space(name, path, spec, low, high, log, knots)
