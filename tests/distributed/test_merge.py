"""Merges over 2 and 3 gloo ranks on this machine (merge() in a spawned process group) against the same
merges in one process: the same bytes in every file; failures on one rank stop every rank and leave
nothing a later run cannot clean."""
from __future__ import annotations

import copy
import os
import socket
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import merge_engine.distributed as distributed
import merge_engine.engine as engine
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
    # BLAS and LAPACK round these by the thread count, which the ranks share with the one process here
    "karcher": ("llama", lambda b, e: {"merge_method": "karcher", "dtype": "float32",
                                       "models": [{"model": m} for m in e]}, 80_000),
    "tsv": ("llama", lambda b, e: {"merge_method": "tsv", "base_model": b, "dtype": "float32",
                                   "models": [{"model": m} for m in e]}, 80_000),
    "one_shard": ("qwen2", lambda b, e: {"merge_method": "ties", "dtype": "float32",
                                         **models(b, e, [{"weight": 0.5, "density": 0.5}] * 3)}, 10**9),
}
SEED = 7  # DARE and DELLA's generator


def options(shard_size: int, **kw) -> MergeOptions:
    return MergeOptions(quiet=True, device="cpu", out_shard_size=shard_size, random_seed=SEED, **kw)


def merge_each(rank: int, configs: dict, root: str) -> dict:
    """On every rank: each config merged into root/NAME; what each report says of the job and its ranks."""
    reports = {}
    for name, (config, shard_size) in configs.items():
        report = merge(parse_config(config), os.path.join(root, name), options(shard_size))
        reports[name] = {"job": [report.tensors, report.bytes_read, report.bytes_written],
                         "ranks": [[r.rank, r.tensors, r.bytes_read, r.bytes_written] for r in report.ranks],
                         "summary": report.summary()}
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
        # each tensor read, merged and written by exactly one rank; every rank's report says so
        report = results[0]["value"][name]
        assert all(r["value"][name]["ranks"] == report["ranks"] for r in results)
        job = [single[name].tensors, single[name].bytes_read, single[name].bytes_written]
        assert report["job"] == job and [sum(f) for f in list(zip(*report["ranks"]))[1:]] == job
        assert [r[0] for r in report["ranks"]] == list(range(size))
        assert all(f"rank {r} ({socket.gethostname()}): " in report["summary"] for r in range(size))
    assert not leftovers(tmp_path / "dist")


FAILING_RANK = 1


@contextmanager
def sabotage(rank: int, how: str, config: dict):
    """What goes wrong on FAILING_RANK in a run: "error": merging its first tensor raises (as out of memory
    would); "plan": it plans another merge (a weight differs); "folder": it is told a temporary folder it
    cannot see (as on a disk the other ranks do not share); "kill": every rank dies merging its first tensor
    (as when the job is killed); "device": it would merge on a GPU, the others on the CPU."""
    if rank != FAILING_RANK and how != "kill":
        yield config
        return
    saved = engine.tensor_group, distributed.broadcast, engine.load_kernels, engine.rank_device

    def failing_group(*args, **kwargs):
        if how == "kill":
            os._exit(9)
        raise RuntimeError("out of memory (injected)")

    def elsewhere(ranks, value):
        _, host = saved[1](ranks, value)
        return "/nonexistent/.out.partial-1", host
    if how in ("error", "kill"):
        engine.tensor_group = failing_group
    if how == "folder":
        distributed.broadcast = elsewhere
    if how == "kernels":  # before its first job: the others' progress exchange must hear of it, not wait

        def no_kernels(device):
            raise RuntimeError("CUDA error: out of memory making a stream (injected)")
        engine.load_kernels = no_kernels
    if how == "device":  # --device auto on a GPU machine beside CPU ones (nothing runs on it: refused first)
        engine.rank_device = lambda device, ranks: torch.device("cuda", 0)
    if how == "plan":
        config = copy.deepcopy(config)
        config["models"][0]["parameters"]["weight"] = 0.25
    try:
        yield config
    finally:
        engine.tensor_group, distributed.broadcast, engine.load_kernels, engine.rank_device = saved


def fail_then_merge(rank: int, config: dict, out: str, how: str) -> dict:
    """A run in which FAILING_RANK fails as `how` says, then the same run without the fault."""
    failure = None
    with sabotage(rank, how, config) as run_config:
        try:  # "outdir": FAILING_RANK is told another output folder
            target = out + "_other" if how == "outdir" and rank == FAILING_RANK else out
            merge(parse_config(run_config), target, options(100_000))
        except (MergeEngineError, RuntimeError) as e:  # the failing rank's own error, the others' RankFailed
            failure = str(e)
    dist.barrier()  # every rank has cleaned up after the failure
    left = sorted(os.listdir(os.path.dirname(out)))
    merge(parse_config(config), out, options(100_000))
    return {"failure": failure, "left": left}


def dare_ties(model_sets) -> dict:
    base, *experts = model_sets("llama")
    return CASES["dare_ties"][1](base, experts)


@pytest.mark.parametrize("how,message", [
    ("error", "failed while merging: merging tensor '"),
    ("folder", "cannot see /nonexistent/.out.partial-1, the temporary output folder rank 0 made on"),
    ("plan", "rank(s) 1 planned a different job from rank 0's"),
    ("outdir", "rank(s) 1 planned a different job from rank 0's"),
    ("kernels", "failed while merging: RuntimeError: CUDA error: out of memory making a stream (injected)"),
    ("device", "rank(s) 1 would merge on another device type than rank 0's (rank 0: cpu, rank 1: cuda)"),
])
def test_a_failing_rank_stops_every_rank_and_leaves_nothing(model_sets, tmp_path, how, message):
    config = dare_ties(model_sets)
    single = tmp_path / "single"
    merge(parse_config(config), str(single), options(100_000))
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    results = run_ranks(fail_then_merge, 2, str(tmp_path / "results"), config, str(out), how)
    assert [r["error"] for r in results] == [None, None], [r.get("traceback") for r in results]
    failures = [r["value"]["failure"] for r in results]
    assert all(failures), "every rank must stop"
    assert all(message in f for f in failures) if how in ("plan", "outdir", "device") else message in failures[0]
    if how == "error":  # the others name the failing rank, its host and its error, tensor included
        own = failures[FAILING_RANK]
        assert own.startswith("merging tensor '") and "out of memory (injected)" in own
        assert f"rank {FAILING_RANK} ({socket.gethostname()}) failed while merging: {own}" in failures[0]
    assert results[0]["value"]["left"] == [], "no output and no temporary folder after a failure"
    assert_same_files(single, out)  # and the next run succeeds


def test_a_killed_rank_leaves_a_folder_the_next_run_removes(model_sets, tmp_path):
    config = dare_ties(model_sets)
    out = tmp_path / "runs" / "out"
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(fail_then_merge, 2, str(tmp_path / "results"), config, str(out), "kill")
    stale = leftovers(tmp_path / "runs")
    assert len(stale) == 1 and not out.exists()
    locks = [f for f in os.listdir(tmp_path / "runs" / stale[0]) if f.startswith(".lock")]
    assert ".lock" in locks and any(f.startswith(f".lock-{socket.gethostname()}-") for f in locks)  # both ranks'
    results = run_ranks(merge_each, 2, str(tmp_path / "results2"), {"out": (config, 100_000)}, str(tmp_path / "runs"))
    assert [r["error"] for r in results] == [None, None], [r.get("traceback") for r in results]
    assert os.listdir(tmp_path / "runs") == ["out"]
    merge(parse_config(config), str(tmp_path / "single"), options(100_000))
    assert_same_files(tmp_path / "single", out)


def merge_watching_the_bar(rank: int, config: dict, out: str) -> list:
    """A merge with its progress shown; each bar the engine made: [shown, bytes counted, total]."""
    bars = []
    made = engine.progress_bar

    def recorded(*args, disable: bool, **kwargs):
        bars.append((not disable, made(*args, disable=disable, **kwargs)))
        return bars[-1][1]
    engine.progress_bar = recorded
    merge(parse_config(config), out, MergeOptions(quiet=False, device="cpu", out_shard_size=60_000))
    return [[shown, bar.n, bar.total] for shown, bar in bars]


def test_rank_0_shows_one_bar_over_the_whole_job(model_sets, tmp_path):
    base, *experts = model_sets("llama")
    config = {"merge_method": "ties", "dtype": "float32", **models(base, experts, [{"weight": 0.5, "density": 0.5}] * 3)}
    job = merge(parse_config(config), str(tmp_path / "single"), options(60_000)).bytes_read
    results = run_ranks(merge_watching_the_bar, 2, str(tmp_path / "results"), config, str(tmp_path / "dist"))
    assert [r["error"] for r in results] == [None, None], [r.get("traceback") for r in results]
    (rank0,), (rank1,) = results[0]["value"], results[1]["value"]
    assert rank0 == [True, job, job]  # every rank's bytes, counted on rank 0's bar
    assert rank1[0] is False  # the other ranks show none
