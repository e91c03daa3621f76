"""mergekit 0.1.5's multislerp, karcher, nearswap (methods/interpolation.py) and sce, ram, ramplus_tl,
arcee_fusion (methods/task_arithmetic.py): their contracts (parameters, base policy, input counts,
output dtype) as mergekit declares them, and what each passes to its op. Bit-for-bit parity with
mergekit is in tests/test_parity_mergekit.py."""
import warnings

import pytest
import torch

from merge_engine import ops, parse_config
from merge_engine.errors import ConfigError
from merge_engine.methods import REGISTRY
from merge_engine.parameters import Scope
from tests.methods.test_methods import group, inputs

S, N = Scope.SHARED, Scope.NON_BASE
REQUIRED = "required"

# From mergekit 0.1.5's merge_methods/*.py: parameters (name, type, scope, default), base policy,
# (min_inputs, max_inputs, min_non_base, max_non_base).
CONTRACTS = {
    "multislerp": ({("weight", float, N, REQUIRED), ("normalize_weights", bool, S, True), ("eps", float, S, 1e-8)},
                   "optional", (1, None, 1, None)),
    "karcher": ({("max_iter", int, S, 10), ("tol", float, S, 1e-5)}, "ignored", (1, None, 0, None)),
    "nearswap": ({("t", float, S, REQUIRED)}, "required", (2, 2, 0, None)),
    "sce": ({("int8_mask", bool, S, False), ("select_topk", float, S, 1.0)}, "required", (1, None, 0, None)),
    "ram": ({("epsilon", float, S, 1e-5)}, "required", (1, None, 0, None)),
    "ramplus_tl": ({("r", float, S, 0.1), ("alpha", float, S, 0.2), ("epsilon", float, S, 1e-5)}, "required",
                   (1, None, 0, None)),
    "arcee_fusion": (set(), "required", (2, 2, 0, None)),
}


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_contract_matches_mergekit(name):
    params, base, counts = CONTRACTS[name]
    m = REGISTRY[name]
    assert {(p.name, p.kind, p.scope, REQUIRED if p.required else p.default) for p in m.params} == params
    assert m.base == base
    assert (m.min_inputs, m.max_inputs, m.min_non_base, m.max_non_base) == counts


def config(method, base="/b", experts=("/e1",), weight=None, **params):
    per = {} if weight is None else {"weight": weight}
    raw = {"merge_method": method, "models": [{"model": e, "parameters": per} for e in experts],
           "parameters": params}
    return raw if base is None else {**raw, "base_model": base}


@pytest.mark.parametrize("method,raw,problem", [
    ("nearswap", config("nearswap", experts=("/e1", "/e2"), t=0.1), "needs exactly 2 inputs, got 3"),
    ("nearswap", config("nearswap", base=None, experts=("/e1", "/e2"), t=0.1), "requires a base_model"),
    ("nearswap", config("nearswap"), "needs parameter 't'"),
    ("arcee_fusion", config("arcee_fusion", experts=("/e1", "/e2")), "needs exactly 2 inputs, got 3"),
    ("arcee_fusion", config("arcee_fusion", experts=("/b",)), "needs exactly 2 inputs, got 1"),
    ("multislerp", config("multislerp", experts=("/b",), weight=0.5), "needs at least 1 non-base inputs, got 0"),
    ("multislerp", config("multislerp"), "needs parameter 'weight' for this model"),
    ("sce", config("sce", base=None, experts=("/e1", "/e2")), "requires a base_model"),
    ("ram", config("ram", base=None, experts=("/e1", "/e2")), "requires a base_model"),
    ("ramplus_tl", config("ramplus_tl", r="much"), "'r' must be float"),
    ("karcher", config("karcher", max_iter="often"), "'max_iter' must be int"),
])
def test_bad_inputs_are_config_errors(method, raw, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_config(raw)


def test_base_only_is_accepted_where_mergekit_accepts_it():
    for method in ("sce", "ram", "ramplus_tl"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            parse_config(config(method, experts=("/b",)))
        t = inputs(0, (4, 5))
        assert torch.equal(REGISTRY[method].merge(group(method, t)), t[0])


@pytest.mark.parametrize("method", ["karcher", "sce"])
def test_ignored_weight_warns(method):
    with pytest.warns(UserWarning, match=rf"parameter 'weight' is not used by merge method '{method}'"):
        parse_config(config(method, experts=("/e1", "/e2"), weight=0.7))


def test_multislerp_passes_weights_and_base():
    t = inputs(3, (6, 5), torch.float64)
    per = [{}, {"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}]
    got = REGISTRY["multislerp"].merge(group("multislerp", t, per_model=per, shared={"eps": 1e-6}))
    assert torch.equal(got, ops.multislerp(t[1:], [0.2, 0.3, 0.5], t[0], True, 1e-6))
    no_base = REGISTRY["multislerp"].merge(group("multislerp", t[1:], None, per_model=per[1:],
                                                 shared={"normalize_weights": False}))
    assert torch.equal(no_base, ops.multislerp(t[1:], [0.2, 0.3, 0.5], None, False))
    # a base and one other model: mergekit returns that model unchanged
    assert torch.equal(REGISTRY["multislerp"].merge(group("multislerp", t[:2], per_model=per[:2])), t[1])


def test_karcher_weighs_every_input_equally_the_base_included():
    t = inputs(2, (7, 3), torch.float64)
    for base_index in (0, 2, None):
        got = REGISTRY["karcher"].merge(group("karcher", t, base_index, per_model=[{}] * 3,
                                              shared={"max_iter": 30, "tol": 1e-9}))
        assert torch.equal(got, ops.karcher_mean(t, [1 / 3] * 3, 30, 1e-9))
    x = t[1]
    assert torch.equal(REGISTRY["karcher"].merge(group("karcher", [x], None, per_model=[{}])), x)


def test_nearswap_uses_the_base_whatever_its_position():
    t = inputs(1, (9, 4))
    want = ops.nearswap(0.05, t[0], t[1])
    assert torch.equal(REGISTRY["nearswap"].merge(group("nearswap", t, 0, shared={"t": 0.05})), want)
    assert torch.equal(REGISTRY["nearswap"].merge(group("nearswap", t[::-1], 1, shared={"t": 0.05})), want)
    assert not torch.equal(want, ops.nearswap(0.05, t[1], t[0]))


def test_task_vector_methods_pass_their_parameters():
    t = inputs(3, (8, 6))
    p = {"select_topk": 0.3}
    assert torch.equal(REGISTRY["sce"].merge(group("sce", t, shared=p)), ops.sce_merge(t[0], t[1:], 0.3))
    assert torch.equal(REGISTRY["ram"].merge(group("ram", t, shared={"epsilon": 0.08})),
                       ops.ram_merge(t[0], t[1:], 0.08))
    got = REGISTRY["ramplus_tl"].merge(group("ramplus_tl", t, shared={"r": 0.5, "alpha": 0.9, "epsilon": 0.08}))
    assert torch.equal(got, ops.ramplus_tl_merge(t[0], t[1:], 0.5, 0.9, 0.08))
    assert not torch.equal(got, ops.ram_merge(t[0], t[1:], 0.08))
    pair = t[:2]
    assert torch.equal(REGISTRY["arcee_fusion"].merge(group("arcee_fusion", pair[::-1], 1)),
                       ops.arcee_fusion(pair[0], pair[1]))


@pytest.mark.parametrize("method", sorted(CONTRACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_output_dtype_is_what_the_merge_returns(method, dtype):
    # mergekit writes a method's result as is when out_dtype is unset: ramplus_tl and arcee_fusion
    # multiply by an fp32 tensor, so bf16 merges come out fp32; the others keep the compute dtype
    t = inputs(1, (6, 6), dtype, seed=3)
    shared = {"t": 0.01} if method == "nearswap" else {}
    per = [{}, {"weight": 1.0}] if method == "multislerp" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = REGISTRY[method].merge(group(method, t, shared=shared, per_model=per))
    assert out.dtype == REGISTRY[method].output_dtype(dtype)
    fp32_quirk = method in ("ramplus_tl", "arcee_fusion") and dtype == torch.bfloat16
    assert out.dtype == (torch.float32 if fp32_quirk else dtype)
