"""Values that make nonsense are refused at validation, by key; values that are allowed but surprising
(extrapolating slerp, a model listed twice, a misspelled parameter) are merged with one warning that
says what happens, and --strict refuses unused parameters."""
import re
import warnings

import pytest

from merge_engine.config import load_config, parse_config, read_yaml
from merge_engine.errors import ConfigError


def linear(weight, **parameters):
    return {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": weight, **parameters}},
                                                 {"model": "b", "parameters": {"weight": 1.0}}]}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf"])
def test_non_finite_parameters_are_refused_by_key(value):
    with pytest.raises(ConfigError, match=r"models\[a\]\.parameters\.weight: 'weight' must be a finite number"):
        parse_config(linear(value))


def test_a_misspelled_parameter_names_the_closest_and_strict_refuses_it():
    config = {"merge_method": "ties", "base_model": "base",
              "models": [{"model": "a", "parameters": {"weight": 1.0, "densty": 0.5}}]}
    with pytest.warns(UserWarning, match="'densty' is not used by merge method 'ties' \\(did you mean 'density'\\?\\)"):
        parse_config(config)
    with pytest.raises(ConfigError, match="did you mean 'density'.*--strict"):
        parse_config(config, strict=True)


def test_extrapolating_slerp_and_repeated_models_warn():
    slerp = {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 1.5},
             "models": [{"model": "a"}, {"model": "b"}]}
    with pytest.warns(UserWarning, match=r"parameters\.t = 1\.5 is outside \[0, 1\]: it extrapolates"):
        parse_config(slerp)
    with pytest.warns(UserWarning, match="a listed more than once"):
        parse_config({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}] * 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_config(dict(slerp, parameters={"t": 0.5}))


def test_a_key_given_twice_keeps_the_later_value_with_a_warning_and_strict_refuses_it(tmp_path):
    path = tmp_path / "config.yml"  # PyYAML, and so mergekit, keeps the later value silently
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: 1.0\n"
                    "      weight: 0.5\n  - model: b\n    parameters: {weight: 1.0}\n"
                    "defaults: &d {weight: 1.0}\nextra:\n  <<: *d\n  weight: 2.0\n")  # a merge key is no repeat
    with pytest.warns(UserWarning) as caught:
        content = read_yaml(str(path))
    assert [str(w.message) for w in caught] == [
        f"{path}: line 6: key 'weight' is given again (first on line 5), and this later value replaces it, "
        "as mergekit reads it"]
    assert content["models"][0]["parameters"] == {"weight": 0.5} and content["extra"] == {"weight": 2.0}
    with pytest.raises(ConfigError, match=r"line 6: key 'weight' is given again .*refused by --strict"):
        load_config(str(path), strict=True)


@pytest.mark.parametrize("method, key, value, caution", [
    ("ties", "density", 1.5, "is above 1: the task vector is kept whole"),
    ("della", "density", -0.2, "is below 0: the task vector is dropped"),
    ("breadcrumbs", "gamma", 1.5, "is outside [0, 1] (mergekit takes it unchecked"),
])
def test_values_mergekit_takes_unchecked_merge_with_a_warning(method, key, value, caution):
    config = {"merge_method": method, "base_model": "base",
              "models": [{"model": "a", "parameters": {"weight": 1.0, key: value}}]}
    with pytest.warns(UserWarning, match=re.escape(f"models[a].parameters.{key} = {value} {caution}")):
        parse_config(config)


def test_a_negative_dare_density_is_refused_as_mergekit_fails_on_it():
    config = {"merge_method": "dare_linear", "base_model": "base",
              "models": [{"model": "a", "parameters": {"weight": 1.0, "density": -0.1}}]}
    with pytest.raises(ConfigError, match="'density' must be >= 0 .*Bernoulli"):
        parse_config(config)


def test_true_for_a_number_merges_as_one_with_a_warning_and_strict_refuses_it():
    with pytest.warns(UserWarning, match=re.escape("models[a].parameters.weight: true is a boolean where a number "
                                                   "belongs: taken as 1.0, as mergekit does")):
        parse_config(linear(True))
    with pytest.raises(ConfigError, match=r"weight: true is a boolean where a number belongs \(--strict refuses"):
        parse_config(linear(True), strict=True)


@pytest.mark.parametrize("kind, value, want", [
    # pydantic's lax validation, which mergekit 0.1.5 applies to every parameter
    (float, True, 1.0), (float, "0.5", 0.5), (float, " 1e-1 ", 0.1), (float, "1_000", 1000.0),
    (int, 3.0, 3), (int, "3", 3), (int, "3.0", 3), (int, True, 1),
    (bool, 1, True), (bool, 0.0, False), (bool, "YES", True), (bool, "off", False), (bool, "t", True),
    (str, "x", "x"),
])
def test_scalars_are_taken_as_mergekit_takes_them(kind, value, want):
    from merge_engine.parameters import ParamSpec, Scope
    got = ParamSpec("p", kind, Scope.SHARED).coerce(value)
    assert got == want and type(got) is kind


@pytest.mark.parametrize("kind, value", [
    (float, "yes"), (float, ""), (int, 3.5), (int, "3.5"), (int, "1e3"), (int, "3."), (bool, 2), (bool, 0.5),
    (bool, "maybe"), (bool, " yes "), (str, 1), (str, True),
])
def test_scalars_mergekit_refuses_are_refused(kind, value):
    from merge_engine.parameters import ParamSpec, Scope
    with pytest.raises(ValueError, match=f"'p' must be {kind.__name__}"):
        ParamSpec("p", kind, Scope.SHARED).coerce(value)
