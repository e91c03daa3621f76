"""The pieces of a distributed run that need no ranks: the assignment of output shards to ranks, and
the plan digest every rank must agree on."""
from __future__ import annotations

import copy

import pytest
import torch

from merge_engine import parse_config
from merge_engine.distributed import assign_shards, balance, digest
from merge_engine.plan import build_plan


@pytest.mark.parametrize("ranks", [1, 2, 3, 8, 40])
def test_each_shard_goes_to_one_rank_and_no_rank_exceeds_the_mean_by_more_than_a_shard(ranks):
    g = torch.Generator().manual_seed(ranks)
    costs = (torch.rand(30, generator=g) * 1000).long().add(1).tolist() + [5000]  # one much larger
    owner = assign_shards(costs, ranks)
    assert len(owner) == len(costs) and all(0 <= r < ranks for r in owner)
    loads = [sum(c for c, r in zip(costs, owner) if r == rank) for rank in range(ranks)]
    assert sum(loads) == sum(costs)
    assert max(loads) <= sum(costs) / ranks + max(costs)  # greedy list scheduling's guarantee
    assert balance(costs, owner, ranks) == pytest.approx(max(loads) / (sum(costs) / ranks))
    assert assign_shards(costs, ranks) == owner  # deterministic
    if ranks >= len(costs):  # more ranks than shards: one shard each at most
        assert len(set(owner)) == len(costs)


@pytest.mark.parametrize("machines", [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]])
def test_shards_go_to_machines_first_then_to_their_ranks(machines):
    """With each rank's machine known, machines are balanced (per rank they hold) before ranks: every
    machine's load is within one shard of its share, which a rank-only assignment does not ensure."""
    g = torch.Generator().manual_seed(len(set(machines)))
    costs = (torch.rand(40, generator=g) * 1000).long().add(1).tolist() + [3000, 3000]
    ranks = len(machines)
    owner = assign_shards(costs, ranks, machines)
    assert len(owner) == len(costs) and all(0 <= r < ranks for r in owner)
    assert assign_shards(costs, ranks, machines) == owner  # deterministic
    for m in set(machines):
        width = machines.count(m)
        load = sum(c for c, r in zip(costs, owner) if machines[r] == m)
        assert load <= sum(costs) * width / ranks + max(costs) * width  # least load per rank first
        its = [r for r in range(ranks) if machines[r] == m]
        rank_loads = [sum(c for c, r in zip(costs, owner) if r == q) for q in its]
        assert max(rank_loads) <= load / width + max(costs)
    # one rank per machine, or a single machine: the plain assignment
    assert assign_shards(costs, 4, [0, 1, 2, 3]) == assign_shards(costs, 4) == assign_shards(costs, 4, [0] * 4)


def test_equal_shards_are_spread_evenly():
    owner = assign_shards([10] * 12, 4)
    assert sorted(owner.count(r) for r in range(4)) == [3, 3, 3, 3]


def test_the_plan_digest_is_that_of_the_plan(model_sets):
    base, *experts = model_sets("llama")
    config = {"merge_method": "dare_ties", "base_model": base, "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.4}} for e in experts]}
    other = copy.deepcopy(config)
    other["models"][1]["parameters"]["density"] = 0.41

    def plan_digest(cfg):
        plan = build_plan(parse_config(cfg))
        return digest(plan.jobs, plan.entries(), 10**9, 0)
    assert plan_digest(config) == plan_digest(copy.deepcopy(config))  # checkpoints opened again, same digest
    assert plan_digest(other) != plan_digest(config)


def test_the_plan_digest_tells_lora_adapters_apart(model_sets, tmp_path):
    # two adapters of one base: the same base path, shapes and dtypes, other tensors
    from tests.lora_adapters import write_adapter
    base, *experts = model_sets("llama")
    adapters = [str(tmp_path / f"a{i}") for i in (1, 2)]
    for i, folder in enumerate(adapters):
        write_adapter(folder, base, seed=i)

    def plan_digest(adapter):
        plan = build_plan(parse_config({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": experts[0], "parameters": {"weight": 0.5}},
            {"model": f"{base}+{adapter}", "parameters": {"weight": 0.5}}]}))
        return digest(plan.jobs, plan.entries(), 10**9, 0)
    assert plan_digest(adapters[0]) != plan_digest(adapters[1])


def test_digest_of_values_and_objects():
    class Opaque:  # printed with its address: known by its type only
        pass
    assert digest([Opaque()], {"a": 1.5}) == digest([Opaque()], {"a": 1.5})
    assert digest({"a": 1.5}) != digest({"a": 1.25}) != digest({"b": 1.25})
    assert digest(torch.tensor([1.0, 2.0])) != digest(torch.tensor([1.0, 2.5]))
    assert digest((1, (2, 3))) != digest(((1, 2), 3))  # nesting counts
