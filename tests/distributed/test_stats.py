"""Grams and Fishers over 2 and 3 gloo ranks: each rank sums its share of the batches, the sums are added
up across ranks, and the result equals one process's within the error of a different summation order."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from merge_engine.errors import MergeEngineError
from merge_engine.stats.fisher import FisherOptions, collect_fisher
from merge_engine.stats.gram import GramOptions, collect_grams
from tests.distributed.ranks import run_ranks

U = 2.0 ** -24  # unit roundoff of float32, in which each process sums
BATCH = 2  # 6 sentences: 3 batches, shared unevenly by 2 ranks, one each by 3
# the sampled Fisher's draws are seeded per batch (stats/fisher.py: batch_seed), so they follow a batch to its rank
FISHERS = [("per_batch", "empirical"), ("per_example", "empirical"), ("per_batch", "sampled")]


def collect(rank: int, model: str, data: str, root: str) -> None:
    collect_grams(model, data, os.path.join(root, "grams"), GramOptions(batch_size=BATCH, device="cpu", quiet=True))
    for granularity, variant in FISHERS:
        collect_fisher(model, data, os.path.join(root, f"fisher_{granularity}_{variant}"),
                       FisherOptions(batch_size=BATCH, per_example=granularity == "per_example", variant=variant,
                                     seed=7, device="cpu", quiet=True))


def manifest(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("size", [2, 3])
def test_distributed_statistics_equal_one_process(tiny_lm, text_file, folder_tensors, tmp_path, size):
    model = tiny_lm("llama")
    collect(0, model, text_file, str(tmp_path / "single"))
    results = run_ranks(collect, size, str(tmp_path / "results"), model, text_file, str(tmp_path / "dist"))
    assert [r["error"] for r in results] == [None] * size, [r.get("traceback") for r in results]
    single, dist = tmp_path / "single", tmp_path / "dist"

    # Grams. Every ordering of a float32 sum of n terms is within gamma_n = n u / (1 - n u) of the exact sum
    # of their absolute values, which for G[i, j] = sum_t x_ti x_tj is at most sqrt(G[i, i] G[j, j])
    # (Cauchy-Schwarz); the ranks' float64 sum of their float32 sums, cast to float32, adds one rounding.
    # So the two results differ by at most (2 gamma_n + u) sqrt(G[i, i] G[j, j]), n the rows summed.
    want, got = manifest(single / "grams", "grams.json"), manifest(dist / "grams", "grams.json")
    assert got == {**want, "model": want["model"]}  # same counts (examples, tokens, rows per module)
    grams, dist_grams = folder_tensors(single / "grams"), folder_tensors(dist / "grams")
    assert grams.keys() == dist_grams.keys()
    for name, g in grams.items():
        n = next(m["rows"] for m in want["modules"].values() if f"{m['gram']}" == name)
        gamma = n * U / (1 - n * U)
        diag = g.double().diagonal().abs()
        bound = (2 * gamma + U) * (diag[:, None] * diag[None, :]).sqrt()
        assert ((dist_grams[name].double() - g.double()).abs() <= bound).all(), name
    # Fishers: F = (sum over B accumulation steps of |B| g^2) / N, every term non-negative, so a sum's error in
    # any order is within gamma_B of the sum itself; the cast and the division add a rounding each.
    for granularity, variant in FISHERS:
        folder = f"fisher_{granularity}_{variant}"
        want, got = manifest(single / folder, "fisher.json"), manifest(dist / folder, "fisher.json")
        assert {k: v for k, v in got.items() if k != "sum_squares"} == \
            {k: v for k, v in want.items() if k != "sum_squares"}
        steps = want["examples"] if granularity == "per_example" else -(-6 // BATCH)
        gamma = steps * U / (1 - steps * U)
        fishers, dist_fishers = folder_tensors(single / folder), folder_tensors(dist / folder)
        assert fishers.keys() == dist_fishers.keys()
        for name, f in fishers.items():
            bound = (2 * gamma + 3 * U) * f.double().abs() + torch.finfo(torch.float32).tiny
            assert ((dist_fishers[name].double() - f.double()).abs() <= bound).all(), name
    assert sorted(os.listdir(dist)) == sorted([f"fisher_{g}_{v}" for g, v in FISHERS] + ["grams"])  # nothing else left


def grams_of_other_data(rank: int, model: str, data: str, out: str) -> str | None:
    """Rank 1 reads one example fewer (a data file that differs between machines)."""
    try:
        collect_grams(model, data, out, GramOptions(batch_size=BATCH, device="cpu", quiet=True,
                                                    max_examples=5 if rank == 1 else None))
    except MergeEngineError as e:
        return str(e)
    return None


def test_ranks_that_read_different_data_are_refused(tiny_lm, text_file, tmp_path):
    results = run_ranks(grams_of_other_data, 2, str(tmp_path / "results"), tiny_lm("llama"), text_file,
                        str(tmp_path / "grams"))
    assert [r["error"] for r in results] == [None, None], [r.get("traceback") for r in results]
    assert all("rank(s) 1 planned a different job from rank 0's" in (r["value"] or "") for r in results)
    assert not os.path.exists(tmp_path / "grams")


def failing_rank_1(rank: int, model: str, data: str, root: str) -> dict:
    """Grams then a Fisher, rank 1 failing on its batches in each (as out of memory would); what each rank
    raised, and what the output folder's parent holds after each run (every rank has cleaned up)."""
    import torch.distributed as dist

    import merge_engine.stats.fisher as fisher
    import merge_engine.stats.gram as gram
    if rank == 1:
        def out_of_memory(*args, **kwargs):
            raise RuntimeError("out of memory (injected)")
        gram.accumulate_pass = fisher._backward_step = out_of_memory
    failures = {}
    for name, collect_stats, options in [("grams", collect_grams, GramOptions), ("fisher", collect_fisher, FisherOptions)]:
        try:
            collect_stats(model, data, os.path.join(root, name), options(batch_size=BATCH, device="cpu", quiet=True))
        except Exception as e:  # noqa: BLE001 (each rank's error, for the test to check)
            failures[name] = f"{type(e).__name__}: {e}"
        dist.barrier()  # as a caller goes on: the ranks agree where they are, none waits in a sum for rank 1
        failures[name + " left"] = os.listdir(root)
    return failures


def test_a_rank_failing_on_its_batches_stops_every_rank_and_writes_nothing(tiny_lm, text_file, tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    results = run_ranks(failing_rank_1, 2, str(tmp_path / "results"), tiny_lm("llama"), text_file, str(root))
    assert [r["error"] for r in results] == [None, None], [r.get("traceback") for r in results]
    rank0, rank1 = (r["value"] for r in results)
    for name, doing in [("grams", "collecting the Grams"), ("fisher", "computing the Fisher")]:
        assert rank1[name] == "RuntimeError: out of memory (injected)"
        assert rank0[name].startswith(f"RankFailed: rank 1 ({socket.gethostname()}) failed while {doing}: "
                                      "RuntimeError: out of memory (injected)"), rank0[name]
        assert rank0[name + " left"] == [] == rank1[name + " left"]
