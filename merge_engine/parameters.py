"""Merge-method parameters: specs, value checks, and mergekit's resolution rules.

A setting is a scalar, a gradient list (piecewise-linear over the layer position t in [0, 1];
non-numeric lists index instead), a {filter, value} condition, or a list of conditions (substring
match on the tensor name, first match wins, filter absent or "*" matches everything). Settings are
looked up from the most specific scope to the least: slice source (per model) > slice > global;
a setting that resolves to nothing (no filter matched) falls through to the next scope.
"""
from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Mapping

from merge_engine.io.untrusted import is_finite_number

Setting = Any  # scalar | list[scalar] | {"filter", "value"} | list[{"filter", "value"}]
_MISSING = object()


class Scope(str, Enum):
    SHARED = "shared"  # one value for the whole tensor group
    INPUT = "input"  # one value per input model, the base included
    NON_BASE = "non_base"  # one value per input model other than the base


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: type  # float, bool, int or str
    scope: Scope
    default: Any = _MISSING
    check: Callable[[Any], str | None] | None = None  # returns a complaint, or None when fine
    caution: Callable[[Any], str | None] | None = None  # a value allowed but worth a warning: what it does

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def coerce(self, value: Any) -> Any:
        """Convert a scalar from YAML to this parameter's type as mergekit's (pydantic's lax) validation does,
        or raise ValueError."""
        converted = {bool: lax_bool, int: lax_int, float: _as_float, str: _as_str}[self.kind](value)
        if converted is None:
            raise ValueError(f"'{self.name}' must be {self.kind.__name__}, got {reprlib.repr(value)}")
        if self.kind in (float, int) and not is_finite_number(converted):  # .nan / .inf merge to nonsense
            raise ValueError(f"'{self.name}' must be a finite number, got {reprlib.repr(value)}")
        return converted

    def validate(self, value: Any) -> Any:
        value = self.coerce(value)
        complaint = self.check(value) if self.check else None
        if complaint:
            raise ValueError(f"'{self.name}' {complaint}, got {value!r}")
        return value


_TRUE_WORDS = {"1", "on", "t", "true", "y", "yes"}
_FALSE_WORDS = {"0", "off", "f", "false", "n", "no"}


def lax_bool(value: Any) -> bool | None:
    """A bool as mergekit's (pydantic's lax) validation takes one: true, 1, 1.0, "yes", "off"...; else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.lower()
        return True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, (bool, int, float)):  # true is 1.0, as in mergekit
        try:
            return float(value)
        except OverflowError:  # an int past any float: coerce names it as not finite
            return math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def lax_int(value: Any) -> int | None:
    """An int as mergekit's (pydantic's lax) validation takes one: 3, 3.0, "3", " 3 ", "3.0", "1_0", true; else None."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\s*([+-]?[0-9_]+)(\.0+)?\s*", value)  # "3" and "3.0", not "3e0"
        try:
            return int(whole.group(1)) if whole else None
        except ValueError:
            return None
    if isinstance(value, float):  # only a whole number is an int, as in mergekit
        return int(value) if value.is_integer() else None
    return int(value) if isinstance(value, int) else None


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def is_boolean_number(spec: ParamSpec, value: Any) -> bool:
    """A YAML true/false given for a number: mergekit takes it as 1 or 0, which is rarely what was meant."""
    return isinstance(value, bool) and spec.kind in (float, int)


def extrapolates(value: float) -> str | None:
    """An interpolation weight outside [0, 1] goes past the models instead of between them."""
    return None if 0 <= value <= 1 else "is outside [0, 1]: it extrapolates beyond the two models (as mergekit does)"


def in_unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def density_outside(value: float) -> str | None:
    """mergekit takes any density: at or above 1 a task vector is kept whole, at or below 0 it is dropped."""
    if value > 1:
        return "is above 1: the task vector is kept whole, as with density 1 (as mergekit does)"
    if value < 0:
        return "is below 0: the task vector is dropped, as with density 0 (as mergekit does)"
    return None


def fraction_outside(value: float) -> str | None:
    """A fraction mergekit takes unchecked: worth a warning outside [0, 1]."""
    return None if 0 <= value <= 1 else "is outside [0, 1] (mergekit takes it unchecked, and so does merge_engine)"


def at_least_zero_for_bernoulli(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0 (a keep probability: mergekit's Bernoulli draw fails below 0)"


def non_negative(value: float) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must be a finite number >= 0"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str))


def is_condition(x: Any) -> bool:
    """A {filter, value} entry. Other keys in it are ignored, as mergekit's schema ignores them (see extra_keys)."""
    return isinstance(x, Mapping) and "value" in x


def is_scalar_or_gradient(x: Any) -> bool:
    return is_scalar(x) or (isinstance(x, list) and all(is_scalar(e) for e in x))


def setting_shape_problem(setting: Setting) -> str | None:
    """Say what is wrong with a setting's structure, or None when it is well-formed."""
    if is_scalar(setting):
        return None
    if is_condition(setting):
        flt = setting.get("filter")
        if flt is not None and not isinstance(flt, str):  # matched as a substring of tensor names
            return f"filter must be a tensor-name substring, got {flt!r}"
        if not is_scalar_or_gradient(setting["value"]):  # mergekit's schema refuses nested filters too
            return f"a {{filter, value}} entry's value must be a scalar or a gradient list, got {setting['value']!r}"
        return None
    if isinstance(setting, list):
        if all(is_scalar(e) for e in setting) or all(is_condition(e) for e in setting):
            return next((p for e in setting if is_condition(e) for p in [setting_shape_problem(e)] if p), None)
        odd = next((e for e in setting if not is_scalar(e) and not is_condition(e)), None)
        if odd is not None:  # a filter entry without its value, a list in the list...
            return f"a list entry that is neither a scalar nor a {{filter, value}} entry: {odd!r}"
        return "a list mixing scalars and {filter, value} entries"
    return f"not a scalar, gradient list or {{filter, value}} entry: {setting!r}"


def extra_keys(setting: Setting) -> list[str]:
    """Keys other than filter and value in a setting's {filter, value} entries: mergekit ignores them, so an entry
    whose 'filter' is misspelt matches every tensor."""
    entries = [setting] if is_condition(setting) else setting if isinstance(setting, list) else []
    return sorted({str(k) for e in entries if is_condition(e) for k in e if k not in ("filter", "value")})


def holds_empty_list(setting: Setting) -> bool:
    """An empty list, as the setting or a filter's value: it sets nothing (mergekit: the next scope decides)."""
    if is_condition(setting):
        return holds_empty_list(setting["value"])
    return isinstance(setting, list) and (not setting or any(holds_empty_list(e) for e in setting if is_condition(e)))


def gives(scope: Mapping[str, Setting] | None, name: str) -> bool:
    """Whether a parameters mapping sets `name` (an empty list sets nothing)."""
    # (not `!= []`: a numpy value compared with a list is an empty array, whose truth value numpy refuses)
    return bool(scope) and name in scope and not (isinstance(scope[name], list) and not scope[name])


def setting_leaves(setting: Setting) -> Iterable[Any]:
    """Every scalar a setting can produce (gradient endpoints, condition values)."""
    if is_scalar(setting):
        yield setting
    elif is_condition(setting):
        yield from setting_leaves(setting["value"])
    elif isinstance(setting, list):
        for e in setting:
            yield from setting_leaves(e)


def evaluate_setting(tensor_name: str, setting: Setting, t: float, spec: ParamSpec) -> Any:
    """The value a setting takes for one tensor at layer position t; None when no filter matched or the
    setting is an empty list (as in mergekit: the next scope decides)."""
    if is_condition(setting):
        setting = [setting]
    if is_scalar(setting):
        return spec.validate(setting)
    if not setting:
        return None
    if all(is_scalar(e) for e in setting):
        values = [spec.validate(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return spec.validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(tensor_name, cond["value"], t, spec)
    return None


def resolve(spec: ParamSpec, scopes: Iterable[Mapping[str, Setting] | None], tensor_name: str, t: float,
            where: str) -> Any:
    """First non-None value of spec over scopes (most specific first), else its default."""
    for scope in scopes:
        if scope is not None and spec.name in scope:
            value = evaluate_setting(tensor_name, scope[spec.name], t, spec)
            if value is not None:
                return value
    if spec.required:
        raise ValueError(f"missing required parameter '{spec.name}' for {where}")
    return spec.default
