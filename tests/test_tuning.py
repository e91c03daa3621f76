"""BMM's outer level (merge_engine/tuning.py): the factorised per-layer solve against the closed form,
the search never ending below the config's own lambda, and the tuned config reproducing the tuned merge
through the engine.

Tolerances: the factorised solve (eigh of S in fp64, factors stored in fp32) and the engine's Cholesky
solve in fp64 differ by the fp32 storage of Q, e, RQ and AQ: a few fp32 ulps of the result amplified by
at most cond(S + lambda I) <= (|S| + lambda) / lambda, which for the trace-scaled Grams (mean eigenvalue 1,
d <= 256) and lambda >= 0.1 is below ~3e3; rtol 1e-3 / atol 1e-5 on weights of size ~1e-2 allows it and
still catches any wrong term (O(1) relative).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from merge_engine.config import parse_config
from merge_engine.engine import MergeOptions, merge
from merge_engine.errors import ConfigError
from merge_engine.io.checkpoint import Checkpoint, split_layer_name
from merge_engine.tuning import BMMProblem, tune_bmm
from tests.stacked_models import make_qwen2_vl
from tests.stats.tiny_text import write_expert_grams


@pytest.fixture(scope="module")
def bmm_config(model_sets, tmp_path_factory):
    paths = model_sets("llama")[:3]
    grams = write_expert_grams(paths[1:], tmp_path_factory.mktemp("tuning"))
    return {"merge_method": "bmm", "base_model": paths[0], "dtype": "float32",
            "models": [{"model": p, "grams": g, "parameters": {"weight": 0.5}} for p, g in zip(paths[1:], grams)],
            "parameters": {"lambda": 0.5}}


@pytest.fixture(scope="module")
def problem(bmm_config):
    return BMMProblem(bmm_config, device="cpu", progress=False)


def engine_merge(cfg, out) -> Checkpoint:
    merge(parse_config(cfg), str(out), MergeOptions(device="cpu", quiet=True))
    return Checkpoint(str(out))


def close(a, b):
    return torch.allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("lam", [0.1, 0.5, 7.0])
def test_factorised_solve_equals_the_engine_merge(problem, bmm_config, tmp_path, lam):
    cfg = {**bmm_config, "parameters": {"lambda": lam}}
    out = engine_merge(cfg, tmp_path / "out")
    state = problem.merged({name: lam for name in problem.systems})
    assert set(state) == set(out.tensors)
    for name in out.tensors:
        if name in problem.systems:
            assert close(state[name], out.read(name)), name
        else:
            assert torch.equal(state[name], out.read(name)), name  # the anchor, computed the same way


def test_groups_by_granularity(problem):
    assert list(problem.groups("model")) == ["model"]
    blocks = problem.groups("block")
    assert set(blocks) == {f"layer {i}" for i in range(4)} | {"lm_head.weight"}
    assert all(len(names) == 7 for key, names in blocks.items() if key.startswith("layer"))
    assert sum(map(len, problem.groups("module").values())) == len(problem.systems) == 29
    with pytest.raises(ValueError, match="granularity"):
        problem.groups("head")


def test_blocks_of_different_layer_stacks_are_different_groups(tmp_path):
    """Qwen2-VL: vision block i and language layer i are two blocks, each with its own lambda."""
    paths = make_qwen2_vl(str(tmp_path), n=2)
    problem = BMMProblem({"merge_method": "bmm", "base_model": paths[0], "parameters": {"data_free": True},
                          "models": [{"model": p} for p in paths[1:]]}, device="cpu", progress=False)
    stacks = {split_layer_name(name)[0] for name in problem.systems if split_layer_name(name)}
    blocks = problem.groups("block")
    assert len(stacks) == 2
    for names in blocks.values():
        assert len({split_layer_name(n)[:2] if split_layer_name(n) else n for n in names}) == 1, names
    assert len(blocks) == len({split_layer_name(n)[:2] if split_layer_name(n) else n for n in problem.systems})


def test_tuning_improves_on_the_default_and_its_config_reproduces_it(problem, bmm_config, tmp_path):
    # a score the tuner can move: closeness of the merged layers to expert 1 (any lambda trade-off would do)
    target = Checkpoint(bmm_config["models"][0]["model"])
    wanted = {name: target.read(name) for name in problem.systems}

    def evaluate(state):
        return -sum(float((state[n] - w).square().sum()) for n, w in wanted.items())
    result = tune_bmm(problem, evaluate, n_trials=12, granularity="model", seed=3, progress=False)
    assert result.trials == 12
    assert result.default_score == evaluate(problem.merged({}))  # trial 0 is the config's own lambda
    assert result.score >= result.default_score
    assert result.score > result.default_score  # lambda 0.5 is not this score's optimum
    out = engine_merge(result.config, tmp_path / "tuned")
    tuned = problem.merged(result.lambdas)
    for name in out.tensors:
        assert close(tuned[name], out.read(name)), name
    assert set(result.lambdas) == set(problem.systems)


def test_a_tuned_config_with_a_slices_own_lambda_reproduces_the_tuned_merge(bmm_config, tmp_path):
    """A slice's own lambda outranks the global one: the tuned config's per-tensor lambdas must not lie under it."""
    layers = Checkpoint(bmm_config["base_model"]).num_layers
    sources = [{"model": bmm_config["base_model"], "layer_range": [0, layers]}] + [
        {**m, "layer_range": [0, layers]} for m in bmm_config["models"]]
    cfg = {k: v for k, v in bmm_config.items() if k not in ("models", "parameters")}
    cfg["slices"] = [{"sources": sources, "parameters": {"lambda": 0.5}}]
    problem = BMMProblem(cfg, device="cpu", progress=False)
    target = Checkpoint(bmm_config["models"][0]["model"])
    wanted = {name: target.read(name) for name in problem.systems}

    def evaluate(state):
        return -sum(float((state[n] - w).square().sum()) for n, w in wanted.items())
    result = tune_bmm(problem, evaluate, n_trials=4, granularity="model", seed=3, progress=False)
    assert result.score > result.default_score  # a tuned lambda, not the slice's 0.5
    out = engine_merge(result.config, tmp_path / "tuned")
    tuned = problem.merged(result.lambdas)
    for name in problem.systems:
        assert close(tuned[name], out.read(name)), name


def test_a_tuned_config_with_a_modules_own_lambda_reproduces_the_tuned_merge(tmp_path):
    """A module's own lambda (a modules: config) outranks the global one too."""
    base, e1 = make_qwen2_vl(str(tmp_path / "models"), n=2)
    every = {"models": [{"model": e1, "parameters": {"weight": 0.5}}]}
    cfg = {"merge_method": "bmm", "base_model": base, "dtype": "float32", "parameters": {"data_free": True},
           "modules": {"text_decoder": {**every, "parameters": {"lambda": 0.5}}, "vision_tower": every,
                       "multi_modal_projector": every}}
    problem = BMMProblem(cfg, device="cpu", progress=False)
    wanted = {name: Checkpoint(e1).read(name) for name in problem.systems}

    def evaluate(state):
        return -sum(float((state[n] - w).square().sum()) for n, w in wanted.items())
    result = tune_bmm(problem, evaluate, n_trials=4, granularity="model", seed=3, progress=False)
    assert result.score > result.default_score
    assert "lambda" not in result.config["modules"]["text_decoder"]["parameters"]
    out = engine_merge(result.config, tmp_path / "tuned")
    tuned = problem.merged(result.lambdas)
    for name in problem.systems:
        assert close(tuned[name], out.read(name)), name

@pytest.mark.parametrize("own", [[{"filter": "self_attn", "value": 0.01}, {"value": 50.0}], 5000.0],
                         ids=["per-tensor", "outside the range"])
def test_the_result_never_scores_below_the_configs_own_lambdas(bmm_config, own):
    """Lambdas the search space cannot hold (per tensor, or outside lambda_range) are still the first
    candidate: with a score that only the config's own merge maximises, the result is that merge, and its
    config is the input's."""
    cfg = {**bmm_config, "parameters": {"lambda": own}}
    problem = BMMProblem(cfg, device="cpu", progress=False)
    wanted = {name: t.clone() for name, t in problem.merged({}).items()}

    def evaluate(state):
        return -sum(float((state[n] - w).square().sum()) for n, w in wanted.items())
    result = tune_bmm(problem, evaluate, n_trials=4, granularity="model", seed=0, progress=False)
    assert result.default_score == result.score == 0.0 and result.trials == 4
    assert result.config == cfg and result.lambdas == problem.default_lambda and result.group_lambdas == {}


def test_lambda_zero_on_singular_grams_stays_finite(bmm_config):
    """These Grams come from a few tokens, so their sums are singular: at lambda 0 the factorised solve gives
    the directions without data nothing (a pseudo-inverse), where dividing by their zero eigenvalues gave
    Inf and NaN."""
    problem = BMMProblem({**bmm_config, "parameters": {"lambda": 0.0}}, device="cpu", progress=False)
    assert any(bool((system.e == 0).any()) for system in problem.systems.values())  # singular, clamped at 0
    state = problem.merged({})
    assert all(torch.isfinite(state[name]).all() for name in problem.systems)


def test_timeout_and_bad_arguments(problem, bmm_config):
    result = tune_bmm(problem, lambda state: 0.0, n_trials=1000, timeout=1.0, granularity="block", progress=False)
    assert 1 <= result.trials < 1000
    with pytest.raises(ValueError, match="lambda_range"):
        tune_bmm(problem, lambda state: 0.0, lambda_range=(0.0, 1.0))
    for bad in (dict(n_trials=0), dict(n_trials=2.5), dict(timeout=-1), dict(timeout=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tune_bmm(problem, lambda state: 0.0, **bad)
    optuna = pytest.importorskip("optuna")
    verbosity = optuna.logging.get_verbosity()
    tune_bmm(problem, lambda state: 0.0, n_trials=1, progress=False)
    assert optuna.logging.get_verbosity() == verbosity  # process-wide: restored
    with pytest.raises(ConfigError, match="merge_method: bmm"):
        BMMProblem({**bmm_config, "merge_method": "regmean"}, device="cpu")


def test_the_problem_writes_into_its_sessions_live_model(problem, bmm_config):
    name = next(iter(problem.systems))
    state = problem.merged({name: 3.0})
    live = problem.session.model.state_dict()[name]
    assert torch.equal(live, state[name]) and torch.equal(live, problem.systems[name].solve(3.0))
    problem.merged({})  # the config's lambda again, for the other tests
    assert problem.session.merge().tensors == len(problem.systems)  # written outside the session: merged again
    reused = BMMProblem(problem.session, progress=False)  # a session opened elsewhere: nothing read again
    assert reused.session is problem.session and set(reused.systems) == set(problem.systems)


FIRST_TUNING = """
import gc, json, os, sys
assert "optuna" not in sys.modules  # this tuning imports it
from merge_engine.session import MergeSession
from merge_engine.tuning import BMMProblem, tune_bmm
descriptors = lambda: len(os.listdir("/proc/self/fd"))
before = descriptors()
tune_bmm(BMMProblem(json.loads(sys.argv[1]), device="cpu", progress=False),
         lambda state: float(state["lm_head.weight"].mean()), n_trials=2, progress=False)
gc.collect()
print(json.dumps([before, descriptors(), sum(isinstance(o, MergeSession) for o in gc.get_objects())]))
"""


def test_the_first_tuning_of_a_process_leaves_nothing_held_once_it_returns(bmm_config):
    """optuna keeps the traceback of its optional imports that fail (redis) for the life of the process, and with it
    every frame on the stack at its first import: the problem's session (inputs, live model, open input files), which
    the caller dropped, must not be among them."""
    ran = subprocess.run([sys.executable, "-c", FIRST_TUNING, json.dumps(bmm_config)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert ran.returncode == 0, ran.stderr
    before, after, sessions = json.loads(ran.stdout.splitlines()[-1])
    assert (after, sessions) == (before, 0)
