"""Config schema: mergekit 0.1.x forms, parameter precedence, gradients, filters, and validation
that reports every problem at once."""
import re

import pytest

from merge_engine import load_config, parse_config
from merge_engine.errors import ConfigError
from merge_engine.parameters import ParamSpec, Scope, evaluate_setting, resolve

W = ParamSpec("weight", float, Scope.INPUT)


@pytest.mark.parametrize("setting,t,want", [
    (0.3, 0.7, 0.3),
    ([0.0, 1.0], 0.25, 0.25),
    ([0.0, 1.0, 0.0], 0.75, 0.5),
    ([0.2, 0.4, 0.6, 0.8], 1.0, 0.8),
    ([1.0, 2.0], 0.0, 1.0),
])
def test_gradients_are_piecewise_linear(setting, t, want):
    assert evaluate_setting("x", setting, t, W) == pytest.approx(want, abs=1e-12)


def test_filters_first_match_wins_and_fall_through():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "proj", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", setting, 0.5, W) == 0.1
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", setting, 0.5, W) == 0.5
    assert evaluate_setting("model.norm.weight", setting, 0.5, W) == 0.9
    assert evaluate_setting("model.norm.weight", [{"filter": "mlp", "value": 1.0}], 0.5, W) is None


def test_precedence_most_specific_first():
    scopes = [{"weight": 0.1}, {"weight": 0.2}, {"weight": 0.3}]  # model, slice, global
    assert resolve(W, scopes, "x", 0, "m") == 0.1
    assert resolve(W, [None, {"weight": 0.2}, {"weight": 0.3}], "x", 0, "m") == 0.2
    # a filter that does not match defers to the next scope
    assert resolve(W, [{"weight": [{"filter": "mlp", "value": 0.5}]}, None, {"weight": 0.3}], "attn", 0, "m") == 0.3
    with pytest.raises(ValueError, match="weight"):
        resolve(W, [None, None], "x", 0, "model a")


def test_an_empty_list_sets_nothing_as_in_mergekit():
    """mergekit evaluates [] to None, so the enclosing parameters (or the default) decide; so does a filter
    whose value is []. Warned about (--strict refuses it)."""
    assert resolve(W, [{"weight": []}, None, {"weight": 0.3}], "x", 0, "m") == 0.3
    assert evaluate_setting("x", [{"filter": "x", "value": []}, {"value": 0.9}], 0, W) is None
    raw = ties_with(0, {"weight": []})
    raw["parameters"]["weight"] = 0.3
    with pytest.warns(UserWarning, match=r"models\[/e1\]\.parameters\.weight: an empty list sets nothing"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="an empty list sets nothing .--strict refuses it"):
        parse_config(raw, strict=True)
    with pytest.raises(ConfigError, match="needs parameter 'weight' for this model"), pytest.warns(UserWarning):
        parse_config(ties_with(0, {"weight": []}))


def test_other_keys_of_a_filter_entry_are_ignored_as_in_mergekit():
    """mergekit's schema drops keys other than filter and value, so an entry with a misspelt filter matches every
    tensor. Warned about, naming the key (--strict refuses it)."""
    raw = ties_with(0, {"weight": [{"fitler": "mlp", "value": 0.2}, {"value": 0.5}]})
    with pytest.warns(UserWarning, match=r"models\[/e1\]\.parameters\.weight: \{filter, value\} entries take no "
                                         r"fitler; an entry without a filter matches every tensor: ignored"):
        cfg = parse_config(raw)
    setting = cfg.slices[0].sources[0].parameters["weight"]
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", setting, 0.0, W) == 0.2
    with pytest.raises(ConfigError, match=r"take no fitler; .* \(--strict refuses it\)"):
        parse_config(raw, strict=True)


def ties_config(**over):
    cfg = {"merge_method": "ties", "base_model": "/b", "parameters": {"normalize": True},
           "models": [{"model": "/e1", "parameters": {"weight": 0.5, "density": 0.5}},
                      {"model": "/e2", "parameters": {"weight": 0.5, "density": [0.1, 0.9]}}]}
    cfg.update(over)
    return cfg


def ties_with(i: int, params: dict):
    """ties_config with models[i]'s parameters updated."""
    cfg = ties_config()
    cfg["models"][i]["parameters"].update(params)
    return cfg


def test_models_form_becomes_one_slice_with_base_appended():
    cfg = parse_config(ties_config())
    (s,) = cfg.slices
    assert [src.model for src in s.sources] == ["/e1", "/e2", "/b"]
    assert cfg.method.name == "ties" and cfg.base_model == "/b"


def test_every_problem_reported_at_once():
    raw = ties_config(merge_method="tie", dtype="float8")
    raw["models"][0]["parameters"]["density"] = "dense"
    raw["models"][1]["parameters"]["weight"] = "heavy"
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    for needle in ("tie", "float8"):
        assert needle in text
    raw = ties_config()
    raw["models"][0]["parameters"]["density"] = "dense"
    raw["models"][1]["parameters"]["weight"] = "heavy"
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "dense" in str(err.value) and "heavy" in str(err.value) and len(err.value.problems) >= 2


@pytest.mark.parametrize("name,hint", [("dare_tie", "did you mean 'dare_ties'? "), ("task_arithmetics",
                                          "did you mean 'task_arithmetic'? "), ("averaging", "")])
def test_an_unknown_merge_method_suggests_the_closest_name(name, hint):
    with pytest.raises(ConfigError, match=re.escape(f"unknown merge_method '{name}' ({hint}supported: ")):
        parse_config(ties_config(merge_method=name))


@pytest.mark.parametrize("raw,match", [
    ({"merge_method": "ties", "models": [{"model": "/a"}]}, "base_model"),
    ({"merge_method": "slerp", "base_model": "/a", "models": [{"model": "/a"}, {"model": "/b"}]}, "'t'"),
    ({"merge_method": "linear"}, "models"),
    ({"merge_method": "linear", "models": [{"model": "/a+/lora+/b"}]}, "BASE\\+ADAPTER"),
    ({"merge_method": "linear", "tokenizer": {"source": "union"}, "tokenizer_source": "base",
      "models": [{"model": "/a"}]}, "not both"),
    ({"merge_method": "linear", "modules": {"text": {}}, "models": [{"model": "/a"}]}, "modules"),
    ({"merge_method": "model_stock", "base_model": "/a", "models": [{"model": "/b"}]}, "model_stock"),
    ({"merge_method": "linear", "tokenizer": {"source": "union", "pad_to_multiple_of": 10**12},
      "models": [{"model": "/a"}]}, r"tokenizer.pad_to_multiple_of: expected an integer from 0 \(no padding\) to 65536"),
    # wrong types and shapes YAML can hold: each one a problem naming the key, never a crash
    (ties_config(merge_method=["ties"]), r"merge_method: expected a method name, got \['ties'\]"),
    (ties_config(merge_method={"a": 1}), r"merge_method: expected a method name, got \{'a': 1\}"),
    (ties_config(parameters=[1, 2]), r"  - parameters: expected a mapping, got \[1, 2\]"),
    (ties_config(models=[{"model": "/e1", "parameters": "x"}]), r"models\[0\]\.parameters: expected a mapping"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "/a", "layer_range": [0, 1]}], "parameters": [1]}]},
     r"slices\[0\]\.parameters: expected a mapping, got \[1\]"),
    (ties_with(0, {5: 3}), r"models\[0\]\.parameters: parameter names must be strings, got 5"),
    (ties_with(0, {"weight": 10**400}), r"models\[/e1\]\.parameters\.weight: 'weight' must be a finite number"),
    (ties_with(0, {"weight": [{"filter": 5, "value": 1.0}]}),
     r"parameters\.weight: filter must be a tensor-name substring, got 5"),
    (ties_with(0, {"weight": [{"filter": ["mlp"], "value": 1.0}, {"value": 0.5}]}),
     r"parameters\.weight: filter must be a tensor-name substring, got \['mlp'\]"),
    # a filter's value is a scalar or a gradient: mergekit's schema refuses a nested filter (or none)
    (ties_with(0, {"weight": [{"filter": "mlp", "value": [{"filter": "up", "value": 0.2}]}, {"value": 0.5}]}),
     r"parameters\.weight: a \{filter, value\} entry's value must be a scalar or a gradient list, got \[\{"),
    (ties_with(0, {"weight": {"filter": "mlp", "value": {"value": 0.2}}}), r"must be a scalar or a gradient list"),
    (ties_with(0, {"weight": {"filter": "mlp", "value": None}}), r"must be a scalar or a gradient list, got None"),
    (ties_with(0, {"weight": [{"filter": "mlp"}, {"value": 0.5}]}),
     r"parameters\.weight: a list entry that is neither a scalar nor a \{filter, value\} entry: \{'filter': 'mlp'\}"),
    (ties_with(0, {"weight": [[0.1, 0.2]]}), r"neither a scalar nor a \{filter, value\} entry: \[0\.1, 0\.2\]"),
    (ties_with(0, {"weight": [0.1, {"value": 0.5}]}), r"a list mixing scalars and \{filter, value\} entries"),
    # mergekit's mapping form of a reference: a revision is kept (two are refused), an architecture override refused
    ({"merge_method": "linear", "models": [{"model": {"model": {"path": "/a@v1", "revision": "v2"}}}]},
     r"models\[0\]\.model: '/a@v1@v2': expected at most one @"),
    ({"merge_method": "linear", "models": [{"model": {"model": "/a", "override_architecture": "MistralForCausalLM"}}]},
     r"models\[0\]\.model: override_architecture is not supported"),
])
def test_invalid_configs(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


@pytest.mark.parametrize("path", ["/a\0b", "/a+/lora\0", "/a+/lora\ud800", "/a\ud800"])
@pytest.mark.parametrize("key", ["models[1].model", "base_model", "models[1].fisher", "tokenizer_source"])
def test_a_path_no_file_name_can_hold_is_a_problem_naming_its_key(path, key):
    """YAML's escapes write a NUL or a lone surrogate; the file system calls would raise ValueError."""
    raw = {"merge_method": "linear", "models": [{"model": "/m", "parameters": {"weight": 1.0}},
                                                 {"model": "/e", "parameters": {"weight": 1.0}}]}
    if key == "models[1].model":
        raw["models"][1]["model"] = path
    elif key == "models[1].fisher":
        raw["models"][1]["fisher"] = path
    else:
        raw[key] = path
    with pytest.raises(ConfigError, match=re.escape(f"{key}: {path!r} cannot be a path")):
        parse_config(raw)


def test_a_token_that_is_not_text_is_a_problem_naming_it():
    """A lone surrogate (YAML's \\ud800): the tokenizer library refused to add it, in a TypeError traceback."""
    raw = {"merge_method": "linear", "models": [{"model": "/m", "parameters": {"weight": 1.0}}],
           "tokenizer": {"source": "base", "tokens": {"a\ud800": {"source": {"kind": "zero"}}, "ok": {}}}}
    with pytest.raises(ConfigError, match=re.escape("tokenizer.tokens: 'a\\ud800' is not text")):
        parse_config(raw)


def test_mergekits_mapping_form_of_a_reference_is_its_text():
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": {"model": {"path": "/a"}, "lora": "/l"},
                        "models": [{"model": {"model": "/b", "lora": {"path": "/m"}}, "parameters": {"weight": 1.0}}]})
    assert cfg.base_model == "/a+/l" and [src.model for src in cfg.slices[0].sources] == ["/b+/m", "/a+/l"]


def test_slices_form():
    cfg = parse_config({"merge_method": "slerp", "base_model": "/a", "parameters": {"t": [0, 1]},
                        "slices": [{"sources": [{"model": "/a", "layer_range": [0, 2]},
                                                {"model": "/b", "layer_range": [2, 4]}]}]})
    assert [src.layer_range for src in cfg.slices[0].sources] == [(0, 2), (2, 4)]


@pytest.mark.parametrize("given,want", [([0.0, "2"], (0, 2)), ([" 1 ", 3.0], (1, 3)), (["0.0", "1_0"], (0, 10)),
                                        ([0, 2.5], None), (["1e0", 2], None), ([2, 2], None), ([-1, 2], None)])
def test_layer_range_numbers_are_taken_as_mergekit_takes_them(given, want):
    # mergekit's schema (pydantic, lax) takes whole floats and integer strings as layer numbers
    raw = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "/a", "layer_range": given}]}]}
    if want is None:
        with pytest.raises(ConfigError, match=re.escape(f"slices[0].sources[0].layer_range: expected [start, end) with "
                                                        f"0 <= start < end, got {given!r}")):
            parse_config(raw)
    else:
        assert parse_config(raw).slices[0].sources[0].layer_range == want


def test_tokenizer_numbers_and_booleans_are_taken_as_mergekit_takes_them():
    raw = {"merge_method": "linear", "models": [{"model": "/a", "parameters": {"weight": 1.0}}], "tokenizer": {
        "source": "union", "pad_to_multiple_of": "8", "tokens": {
            "x": {"source": {"kind": "model_token", "model": "/a", "token_id": "5"}, "force": "yes"},
            "y": {"source": {"kind": "model_token", "model": "/a", "token_id": 2.0}, "force": 0}}}}
    tok = parse_config(raw).tokenizer
    assert tok.pad_to_multiple_of == 8
    assert (tok.tokens["x"].source.token_id, tok.tokens["x"].force) == (5, True)
    assert (tok.tokens["y"].source.token_id, tok.tokens["y"].force) == (2, False)
    raw["tokenizer"]["pad_to_multiple_of"] = 8.5
    raw["tokenizer"]["tokens"]["x"]["force"] = "maybe"
    raw["tokenizer"]["tokens"]["y"]["source"]["token_id"] = "2e0"
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "tokenizer.pad_to_multiple_of", "tokenizer.tokens['x'].force", "tokenizer.tokens['y'].source.token_id"]


def test_unknown_tokenizer_keys_are_ignored_with_a_warning_as_mergekit_ignores_them():
    raw = {"merge_method": "linear", "models": [{"model": "/a", "parameters": {"weight": 1.0}}], "tokenizer": {
        "source": "base", "note": 1, "tokens": {"x": {"source": {"kind": "zero", "why": "blank"}, "forced": True},
                                                "y": {"source": {"kind": "model_token", "model": "/a", "token_id": 1,
                                                                 "id": 2}}}}}
    with pytest.warns(UserWarning) as caught:
        tok = parse_config(raw).tokenizer
    assert (tok.source, tok.tokens["x"].source.kind, tok.tokens["x"].force, tok.tokens["y"].source.token_id) == (
        "base", "zero", False, 1)
    assert sorted(str(w.message) for w in caught) == sorted(
        f"{where}: ignoring unknown key(s) {keys} (mergekit ignores them too)" for where, keys in [
            ("tokenizer", ["note"]), ("tokenizer.tokens['x']", ["forced"]),
            ("tokenizer.tokens['x'].source", ["why"]), ("tokenizer.tokens['y'].source", ["id"])])
    with pytest.raises(ConfigError) as err:  # a misspelt key (base_modle) sets nothing: --strict refuses it
        parse_config({**raw, "base_modle": "/a"}, strict=True)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "config", "tokenizer", "tokenizer.tokens['x']", "tokenizer.tokens['x'].source", "tokenizer.tokens['y'].source"]
    assert "unknown key(s) ['base_modle'] (mergekit ignores them; --strict refuses them)" in err.value.problems[0]


def test_yaml_aliases_that_expand_past_a_million_values_are_refused(tmp_path):
    """Nested aliases ("billion laughs") load as shared lists in little memory; walking them does not."""
    lines = ["merge_method: linear", "models: []", 'l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, 7)]  # 10**7 values
    path = tmp_path / "laughs.yml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="expands to more than 1,000,000 values through its aliases") as err:
        load_config(str(path))
    assert err.value.source == str(path)
    path.write_text("\n".join(lines[:-2]) + "\n")  # up to l4, 10**5 values in all: read, then refused for what it holds
    with pytest.raises(ConfigError) as other:
        load_config(str(path))
    assert "expands to more than" not in str(other.value)


def test_yaml_nested_too_deep_names_the_file(tmp_path):
    path = tmp_path / "deep.yml"
    path.write_text("merge_method: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError, match="invalid YAML: nested too deeply") as err:
        load_config(str(path))
    assert err.value.source == str(path) and str(path) in str(err.value)


def test_a_config_that_is_a_fifo_or_missing_is_refused_without_blocking(tmp_path):
    import os
    os.mkfifo(tmp_path / "merge.yml")  # nothing writes to it: a plain open would wait forever
    with pytest.raises(ConfigError, match="is a FIFO, not a regular file") as err:
        load_config(str(tmp_path / "merge.yml"))
    assert err.value.source == str(tmp_path / "merge.yml")
    with pytest.raises(ConfigError, match=r"cannot read \(No such file"):
        load_config(str(tmp_path / "missing.yml"))


@pytest.mark.parametrize("text, problem", [
    ("[a]: 3\n", "invalid YAML: while constructing a mapping found unhashable key (line 1, column 1)"),
    ("merge_method: linear\nmodels: [1, 2\n", "but got '<stream end>' (line 3, column 1)"),
    ("a: b: c\n", "invalid YAML: mapping values are not allowed here (line 1, column 5)"),
])
def test_invalid_yaml_is_one_line_with_its_place(tmp_path, text, problem):
    path = tmp_path / "merge.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert len(err.value.problems) == 1 and "\n" not in err.value.problems[0] and problem in err.value.problems[0]


def test_a_tokenizer_padded_to_a_multiple_of_zero_is_not_padded_as_in_mergekit():
    raw = {"merge_method": "linear", "models": [{"model": "/a", "parameters": {"weight": 1.0}}],
           "tokenizer": {"source": "union", "pad_to_multiple_of": 0}}
    assert parse_config(raw).tokenizer.pad_to_multiple_of is None
    raw["tokenizer"]["pad_to_multiple_of"] = -8
    with pytest.raises(ConfigError, match="tokenizer.pad_to_multiple_of: expected an integer from 0"):
        parse_config(raw)


def test_numpy_parameter_values_in_a_mapping_are_taken_or_refused_by_name():
    import numpy as np
    raw = {"merge_method": "ties", "base_model": "/base",
           "models": [{"model": "/a", "parameters": {"weight": np.float64(0.5), "density": 0.3}}]}
    assert parse_config(raw).slices[0].sources[0].parameters["weight"] == 0.5  # numpy's float64 is a float
    raw["models"][0]["parameters"]["weight"] = np.float32(0.5)
    with pytest.raises(ConfigError, match=r"models\[/a\].parameters.weight: not a scalar"):
        parse_config(raw)
