"""The tsv and iso_c methods: their parameters on TensorGroups, whole merges through the engine on tiny
Llama checkpoints (equal, tensor by tensor, to the ops), and config errors before any data is read."""
import os

import pytest
import torch

from merge_engine import ops
from merge_engine.config import parse_config
from merge_engine.engine import MergeOptions, merge
from merge_engine.errors import ConfigError
from merge_engine.methods import REGISTRY, TensorGroup
from merge_engine.ops.spectral import mean_task_arithmetic

OPTIONS = MergeOptions(device="cpu", quiet=True)
SKIP_EMBEDDINGS = [{"filter": "embed_tokens", "value": False}, {"value": True}]


def group(method, tensors, **shared):
    params = {p.name: p.default for p in REGISTRY[method].shared_params}
    params.update(shared)
    return TensorGroup("w", tensors, 0, params, [{} for _ in tensors])


def inputs(k, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in range(k)]


def test_unset_rank_fraction_is_one_over_the_number_of_experts():
    t = inputs(3, (9, 12))
    got = REGISTRY["tsv"].merge(group("tsv", t, alpha=0.5))
    assert torch.equal(got, ops.tsv_merge(t[0], t[1:], 1 / 3, 0.5))  # int(9 * (1/3)) = 3 = 9 // 3
    assert not torch.equal(got, ops.tsv_merge(t[0], t[1:], 2 / 9, 0.5))


@pytest.mark.parametrize("method", ["tsv", "iso_c"])
def test_svd_false_takes_the_mean_task_vector(method):
    t = inputs(2, (6, 8))
    got = REGISTRY[method].merge(group(method, t, alpha=1.5, svd=False))
    assert torch.equal(got, mean_task_arithmetic(t[0], t[1:], 1.5))
    assert not torch.equal(got, REGISTRY[method].merge(group(method, t, alpha=1.5)))


def run(cfg, out):
    merge(parse_config(cfg), str(out), OPTIONS)


@pytest.mark.parametrize("method,key,params", [
    ("tsv", "llama", {"alpha": 0.8, "svd": SKIP_EMBEDDINGS}),
    ("tsv", "llama", {"rank_fraction": 0.1}),
    ("iso_c", "llama_bf16_sharded", {"alpha": 1.3, "svd": SKIP_EMBEDDINGS}),
])
def test_engine_merge_equals_the_op_on_every_tensor(model_sets, folder_tensors, tmp_path, method, key, params):
    paths = model_sets(key)
    cfg = {"merge_method": method, "base_model": paths[0], "models": [{"model": p} for p in paths[1:]],
           "parameters": params}
    run(cfg, tmp_path / "out")
    out = folder_tensors(tmp_path / "out")
    tensors = [folder_tensors(p) for p in paths]
    assert set(out) == set(tensors[0])
    alpha = params.get("alpha", 1.0)
    for name, merged in out.items():
        base, experts = tensors[0][name], [t[name] for t in tensors[1:]]
        if "embed_tokens" in name and "svd" in params:
            want = mean_task_arithmetic(base, experts, alpha)
        elif method == "tsv":
            want = ops.tsv_merge(base, experts, params.get("rank_fraction"), alpha)
        else:
            want = ops.iso_c(base, experts, alpha)
        assert merged.dtype == base.dtype and torch.equal(merged, want), name


@pytest.mark.parametrize("params,problem", [
    ({"rank_fraction": 0}, r"parameters.rank_fraction: 'rank_fraction' must be in \(0, 1\], got 0.0"),
    ({"rank_fraction": 1.5}, r"parameters.rank_fraction: 'rank_fraction' must be in \(0, 1\], got 1.5"),
    ({"rank_fraction": [0.5, 2]}, r"'rank_fraction' must be in \(0, 1\], got 2.0"),
    ({"alpha": float("inf")}, "parameters.alpha: 'alpha' must be a finite number, got inf"),
    ({"svd": "sometimes"}, "parameters.svd: 'svd' must be bool, got 'sometimes'"),
])
def test_bad_parameters_are_config_errors_before_reading(model_sets, tmp_path, params, problem):
    paths = model_sets("llama")
    cfg = {"merge_method": "tsv", "base_model": paths[0], "models": [{"model": p} for p in paths[1:]],
           "parameters": params}
    with pytest.raises(ConfigError, match=problem):
        run(cfg, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("method", ["tsv", "iso_c"])
def test_a_base_and_an_expert_are_required(model_sets, tmp_path, method):
    paths = model_sets("llama")
    with pytest.raises(ConfigError, match=f"merge method '{method}' requires a base_model"):
        run({"merge_method": method, "models": [{"model": p} for p in paths[1:]]}, tmp_path / "out")
    with pytest.raises(ConfigError, match=f"merge method '{method}' needs at least 1 non-base inputs, got 0"):
        run({"merge_method": method, "base_model": paths[0], "models": [{"model": paths[0]}]}, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
