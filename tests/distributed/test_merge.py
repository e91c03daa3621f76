"""Merges over 2 and 3 gloo ranks on this machine (merge() in a spawned process group) against the same
merges in one process: the same bytes in every file; failures on one rank stop every rank and leave
nothing a later run cannot clean."""
from __future__ import annotations

import os

import pytest
import torch.distributed as dist

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.errors import MergeEngineError
from tests.distributed.ranks import run_ranks

GRADIENT = [0.2, 0.9, 0.4]


def models(base, experts, params):
    return {"base_model": base, "models": [{"model": e, "parameters": p} for e, p in zip(experts, params)]}


# name -> (model set, config builder(base, experts), output shard size): several shards each, but for
# "one_shard", whose single shard leaves ranks with nothing to write
CASES = {
    "linear": ("llama", lambda b, e: {"merge_method": "linear", "dtype": "float32",
                                      "models": [{"model": m, "parameters": {"weight": w}}
                                                 for m, w in zip([b, *e], (1.0, GRADIENT, 0.5, 0.3))]}, 100_000),
    "ties_bf16": ("llama_bf16_sharded", lambda b, e: {
        "merge_method": "ties", "dtype": "bfloat16", "parameters": {"normalize": True},
        **models(b, e, [{"weight": 0.6, "density": 0.5}, {"weight": GRADIENT, "density": 0.3}])}, 60_000),
    "dare_ties": ("llama", lambda b, e: {"merge_method": "dare_ties", "dtype": "float32",
                                         **models(b, e, [{"weight": 0.5, "density": 0.4}] * 3)}, 150_000),
    "della": ("llama", lambda b, e: {"merge_method": "della", "dtype": "float32",
                                     **models(b, e, [{"weight": 0.5, "density": 0.5, "epsilon": 0.1}] * 2)}, 150_000),
    "slerp_slices": ("llama", lambda b, e: {
        "merge_method": "slerp", "base_model": b, "dtype": "float32",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
        "slices": [{"sources": [{"model": b, "layer_range": [0, 2]}, {"model": e[0], "layer_range": [0, 2]}]},
                   {"sources": [{"model": b, "layer_range": [2, 4]}, {"model": e[1], "layer_range": [2, 4]}]}]},
        80_000),
    "one_shard": ("qwen2", lambda b, e: {"merge_method": "ties", "dtype": "float32",
                                         **models(b, e, [{"weight": 0.5, "density": 0.5}] * 3)}, 10**9),
}
SEED = 7  # DARE and DELLA's generator


def options(shard_size: int, **kw) -> MergeOptions:
    return MergeOptions(quiet=True, device="cpu", out_shard_size=shard_size, random_seed=SEED, **kw)


def merge_each(rank: int, configs: dict, root: str) -> dict:
    """On every rank: each config merged into root/NAME; the figures each rank's report gives."""
    reports = {}
    for name, (config, shard_size) in configs.items():
        report = merge(parse_config(config), os.path.join(root, name), options(shard_size))
        reports[name] = [report.tensors, report.bytes_written]
    return reports


def assert_same_files(single, distributed):
    assert sorted(os.listdir(distributed)) == sorted(os.listdir(single))
    for f in os.listdir(single):
        with open(os.path.join(single, f), "rb") as a, open(os.path.join(distributed, f), "rb") as b:
            assert a.read() == b.read(), f"{distributed}/{f} differs from the single-process merge"


def leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if ".partial-" in f]


@pytest.mark.parametrize("size", [2, 3])
def test_distributed_merge_is_bit_identical(model_sets, tmp_path, size):
    configs, single = {}, {}
    for name, (key, build, shard_size) in CASES.items():
        base, *experts = model_sets(key)
        configs[name] = (build(base, experts), shard_size)
        single[name] = merge(parse_config(configs[name][0]), str(tmp_path / "single" / name), options(shard_size))
    results = run_ranks(merge_each, size, str(tmp_path / "results"), configs, str(tmp_path / "dist"))
    assert [r["error"] for r in results] == [None] * size, [r.get("traceback") for r in results]
    for name in CASES:
        assert_same_files(tmp_path / "single" / name, tmp_path / "dist" / name)
        shards = [f for f in os.listdir(tmp_path / "single" / name) if f.endswith(".safetensors")]
        assert (len(shards) == 1) == (name == "one_shard")
        # each tensor merged and written by exactly one rank
        tensors, written = map(sum, zip(*(r["value"][name] for r in results)))
        assert (tensors, written) == (single[name].tensors, single[name].bytes_written)
    assert not leftovers(tmp_path / "dist")
