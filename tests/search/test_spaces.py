"""Search spaces in a config (merge_engine/search/spaces.py): where they may stand, their names, the plain
config a trial's parameters make, and every malformed space refused with its place in the config."""
from __future__ import annotations

import pytest

from merge_engine.errors import ConfigError
from merge_engine.search import parse_search_config

MODELS = ["/m/base", "/m/e1", "/m/e2"]


def config(**parameters) -> dict:
    models = parameters.pop("models", [{}, {}])
    return {"merge_method": "dare_ties", "base_model": MODELS[0], "parameters": parameters,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5, **p}} for m, p in zip(MODELS[1:], models)]}


def test_spaces_everywhere_a_setting_stands():
    raw = config(normalize={"choice": [True, False]},
                 **{"lambda": [{"filter": "mlp", "value": {"search": [0.5, 1.5]}}, {"value": 1.0}]},
                 models=[{"weight": {"search": [0.1, 2.0], "log": True}}, {"density": {"search": [0.2, 0.9], "knots": 3}}])
    cfg = parse_search_config(raw)
    assert [(s.name, s.low, s.high, s.log, s.knots, s.choices) for s in cfg.spaces] == [
        ("normalize", None, None, False, 0, (True, False)),
        ("lambda[filter=mlp]", 0.5, 1.5, False, 0, ()),
        ("models[0].weight", 0.1, 2.0, True, 0, ()),
        ("models[1].density", 0.2, 0.9, False, 3, ())]
    params = {"normalize": False, "lambda[filter=mlp]": 0.7, "models[0].weight": 0.3,
              "models[1].density[0]": 0.2, "models[1].density[1]": 0.4, "models[1].density[2]": 0.9}
    plain = cfg.concrete(params)
    assert plain["parameters"] == {"normalize": False, "lambda": [{"filter": "mlp", "value": 0.7}, {"value": 1.0}]}
    assert plain["models"][0]["parameters"] == {"weight": 0.3, "density": 0.5}
    assert plain["models"][1]["parameters"] == {"weight": 1.0, "density": [0.2, 0.4, 0.9]}
    assert "search" not in plain
    start = cfg.start()  # the middle: log-middle for log ranges, the first choice
    assert start["models[0].weight"] == pytest.approx((0.1 * 2.0) ** 0.5) and start["normalize"] is True
    assert start["models[1].density[2]"] == pytest.approx(0.55)


def test_slice_sources_and_integer_parameters():
    raw = {"merge_method": "slerp", "base_model": MODELS[0], "slices": [{"sources": [
        {"model": MODELS[0], "layer_range": [0, 2]}, {"model": MODELS[1], "layer_range": [0, 2]}],
        "parameters": {"t": {"search": [0, 1], "knots": 3}}}]}
    cfg = parse_search_config(raw)
    assert [s.name for s in cfg.spaces] == ["slices[0].t"]
    assert cfg.concrete({"slices[0].t[0]": 0.0, "slices[0].t[1]": 1.0, "slices[0].t[2]": 0.5})["slices"][0][
        "parameters"] == {"t": [0.0, 1.0, 0.5]}


BAD = {  # a space -> what the message names
    "parameter the method lacks": (dict(models=[{"t": {"search": [0, 1]}}, {}]),
                                   r"models\[0\].parameters.t: a search space on 't', which merge method 'dare_ties' does not have"),
    "outside the parameter's range": (dict(models=[{"density": {"search": [-0.5, 0.5]}}, {}]),
                                      r"models\[0\].parameters.density.search: 'density' must be >= 0"),
    "where the parameter warns": (dict(models=[{"density": {"search": [0.5, 1.5]}}, {}]),
                                  r"models\[0\].parameters.density.search: 'density' = 1.5 is above 1: .*a search "
                                  "space stays within the values that merge without a warning"),
    "a choice where the parameter warns": (dict(models=[{"density": {"choice": [0.5, 2]}}, {}]),
                                           r"density.choice: 'density' = 2.0 is above 1"),
    "reversed range": (dict(models=[{"weight": {"search": [2, 1]}}, {}]), r"low < high, got \[2, 1\]"),
    "one bound": (dict(models=[{"weight": {"search": [1]}}, {}]), r"\[low, high\]"),
    "log of zero": (dict(models=[{"weight": {"search": [0, 1], "log": True}}, {}]), "log: true needs low > 0"),
    "one knot": (dict(models=[{"density": {"search": [0.1, 0.5], "knots": 1}}, {}]), "knots: an integer of at least 2"),
    "too many knots": (dict(models=[{"density": {"search": [0.1, 0.5], "knots": 10**8}}, {}]),
                       r"models\[0\].parameters.density.knots: at most 1024 .* got 100000000"),
    "unknown key": (dict(models=[{"weight": {"search": [0.1, 1], "step": 0.1}}, {}]), "a search space is"),
    "a misspelt space key": (dict(models=[{"density": {"serch": [0.1, 0.9]}}, {}]),
                             r"models\[0\].parameters.density: a search space is .*'serch' \(did you mean 'search'\?\)"),
    "a misspelt choice": (dict(normalize={"choise": [True, False]}), r"'choise' \(did you mean 'choice'\?\)"),
    "both forms": (dict(models=[{"weight": {"search": [0.1, 1], "choice": [1, 2]}}, {}]), "a search space is"),
    "one choice": (dict(normalize={"choice": [True]}), "a list of at least two values"),
    "bad choice": (dict(normalize={"choice": [True, "maybe"]}), "normalize.choice: 'normalize' must be bool"),
    "a choice given twice": (dict(normalize={"choice": [True, False, True]}),
                             r"parameters.normalize.choice: True is given twice"),
    "a choice given twice, spelt otherwise": (dict(models=[{"weight": {"choice": [1, 0.5, 1.0]}}, {}]),
                                              r"models\[0\].parameters.weight.choice: 1.0 is given twice"),
    "true for a number": (dict(models=[{"weight": {"choice": [True, 0.5]}}, {}]),
                          "'weight' is a number; true and false are not"),
    "range on a bool": (dict(normalize={"search": [0, 1]}), "search it with {choice"),
    "no space": (dict(), "no search space"),
    "an integer bound beyond any float": (dict(models=[{"weight": {"search": [1, 10**400]}}, {}]),
                                          r"models\[0\].parameters.weight.search: \[low, high\] with finite numbers"),
    "two spaces of one name": (dict(models=[{"weight": [{"filter": "mlp", "value": {"search": [0.1, 1]}},
                                                        {"filter": "mlp", "value": {"choice": [0.5, 0.7]}},
                                                        {"value": 1.0}]}, {}]),
                               r"models\[0\].parameters.weight\[1\].value: a second search space named "
                               r"models\[0\].weight\[filter=mlp\] \(the first is at models\[0\].parameters.weight\[0\].value\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_spaces_are_refused_with_their_place(case):
    change, message = BAD[case]
    with pytest.raises(ConfigError, match=message):
        parse_search_config(config(**change))


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as e:
        parse_search_config(config(models=[{"t": {"search": [0, 1]}}, {"weight": {"search": [2, 1]}}]))
    assert len(e.value.problems) == 2


def test_the_rest_of_the_config_is_checked_too():
    raw = config(models=[{"weight": {"search": [0.1, 1]}}, {}])
    raw["dtype"] = "float13"
    with pytest.raises(ConfigError, match="dtype"):
        parse_search_config(raw)


@pytest.mark.parametrize("method, message", [({"choice": ["ties", "linear"]}, "merge_method: expected a method name"),
                                             (["ties"], "merge_method: expected a method name"),
                                             ("no_such_method", "unknown merge_method 'no_such_method'")])
def test_a_method_that_is_not_a_name_is_named(method, message):
    with pytest.raises(ConfigError, match=message):
        parse_search_config({**config(normalize={"choice": [True, False]}), "merge_method": method})


def test_keys_that_are_not_names_are_refused():
    with pytest.raises(ConfigError, match="1: a config's keys are names"):
        parse_search_config({**config(normalize={"choice": [True, False]}), 1: 2})


def test_a_space_where_the_method_does_not_read_it_is_refused():
    """mergekit reads a method's global parameters once, and non-base parameters of the other models only: a
    space there would change no tensor while the sampler spends trials on it."""
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.lambda: merge method 'dare_ties' reads 'lambda' "
                                          r"once for the whole merge"):
        parse_search_config(config(models=[{"lambda": {"search": [0.5, 1.5]}}, {}]))
    on_base = config(normalize={"choice": [True, False]})
    on_base["models"].append({"model": MODELS[0], "parameters": {"weight": {"search": [0.1, 1.0]}}})
    with pytest.raises(ConfigError, match=r"models\[2\].parameters.weight: merge method 'dare_ties' reads 'weight' "
                                          "for the models other than the base"):
        parse_search_config(on_base)
    global_lambda = config(**{"lambda": {"search": [0.5, 1.5]}})  # where it is read: accepted
    assert [s.name for s in parse_search_config(global_lambda).spaces] == ["lambda"]
