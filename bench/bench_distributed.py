"""Benchmark and scaling model of distributed merges (docs/distributed.md).

Measure (the default): the ~1.1B-parameter Llama-shaped TIES merge of bench_merge.py (bf16, CPU), run by
`python -m merge_engine` (one rank) and by `torchrun --standalone --nproc-per-node 2 -m merge_engine`
(two gloo ranks, one thread each as torchrun sets), each on a cold page cache, with the same output shard
size (--out-shard-size, small enough that both ranks get shards); checks that both outputs are the same
bytes and prints wall time, GB/s and the I/O floor of the job (read every input, write the output).

    python bench/bench_distributed.py                  # TinyLlama-1.1B shape
    python bench/bench_distributed.py --small          # a few-MB model: checks the script, times nothing useful

Model (--model): no merge is run. For Llama-3-70B and Llama-3.1-405B (published shapes, bf16, untied
embeddings), a three-input merge's output tensors are laid out into shards by the engine's own
plan_shards and assigned to 8 ranks per node, 1-16 nodes, by its own assign_shards; prints the shards,
the ranks that get work, bytes per rank, the balance (largest rank's bytes over the mean) and the
expected time for a per-node I/O bandwidth (--node-gbps), next to the single-node I/O floor.

    python bench/bench_distributed.py --model --node-gbps 2   # bench/RESULTS.md, "Scaling model"
"""
from __future__ import annotations

import argparse
import filecmp
import math
import os
import shutil
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import (  # noqa: E402 (bench/ is not a package)
    SHAPE,
    drop_caches,
    engine_info,
    folder_bytes,
    generate_models_apart,
    io_floor,
    machine,
    run_merge,
    safetensors_files,
    tensor_shapes,
    write_config,
)

from merge_engine.distributed import assign_shards, balance  # noqa: E402
from merge_engine.io.writer import plan_shards  # noqa: E402

TINY = {"layers": 2, "hidden": 256, "intermediate": 704, "vocab": 4096, "heads": 4, "kv_heads": 4}
# published shapes (config.json of meta-llama/Meta-Llama-3-70B and Llama-3.1-405B); head dim 128 = hidden / heads
MODELS = {
    "Llama-3-70B": {"layers": 80, "hidden": 8192, "intermediate": 28672, "vocab": 128256, "heads": 64, "kv_heads": 8},
    "Llama-3.1-405B": {"layers": 126, "hidden": 16384, "intermediate": 53248, "vocab": 128256, "heads": 128,
                       "kv_heads": 8},
}
INPUTS = 3  # a three-input merge: each output tensor reads three and writes one
RANKS_PER_NODE = 8
NODES = (1, 2, 4, 8, 16)
SHARD_SIZES = (5 * 10**9, 10**9)  # the default (mergekit's), and one that gives every rank work


def torchrun() -> str:
    return shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def measure(a) -> None:
    root = os.path.join(os.path.abspath(a.work), f"llama-L{a.layers}-H{a.hidden}-I{a.intermediate}-V{a.vocab}")
    paths = generate_models_apart(SimpleNamespace(**vars(a)), root)
    config = write_config(paths, os.path.join(root, "ties.yml"))
    inputs = [f for path in paths for f in safetensors_files(path)]
    in_bytes, out_bytes = sum(map(folder_bytes, paths)), folder_bytes(paths[0])
    merge_args = [config, "--device", "cpu", "--out-shard-size", str(a.out_shard_size), "-q"]
    engine = engine_info()
    dropped = drop_caches()
    floor = io_floor(inputs, out_bytes, os.path.join(root, "scratch.bin"), direct=True)
    runs = {1: [sys.executable, "-m", "merge_engine"],
            2: [torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "merge_engine"]}
    rows = []
    for ranks, command in runs.items():
        out = os.path.join(root, f"out-{ranks}ranks")
        wall, rss, cpu, other = run_merge([*command, merge_args[0], out, *merge_args[1:]], out,
                                          os.path.join(root, f"log-{ranks}ranks.txt"))
        rows.append((ranks, wall, cpu, other, out))
    same = all(filecmp.cmp(os.path.join(rows[0][4], f), os.path.join(rows[1][4], f), shallow=False)
               for f in os.listdir(rows[0][4]))
    shards = len(safetensors_files(rows[0][4]))
    print(f"## 1 vs 2 ranks: TIES, 3 experts, {in_bytes / 1e9:.2f} GB read, {out_bytes / 1e9:.2f} GB written "
          f"({shards} output shards of at most {a.out_shard_size / 1e9:g} GB)\n")
    print(machine(dropped))
    print(engine)
    print(f"- outputs identical: {'yes' if same else 'NO'}\n")
    print("| run | wall s | GB/s (read + written) | CPU s (all ranks) | other load, cores |")
    print("|---|---:|---:|---:|---:|")
    print(f"| I/O floor (O_DIRECT reads and writes) | {floor:.2f} | {(in_bytes + out_bytes) / floor / 1e9:.2f} | | |")
    for ranks, wall, cpu, other, _ in rows:
        print(f"| {ranks} rank(s) | {wall:.2f} | {(in_bytes + out_bytes) / wall / 1e9:.2f} | {cpu:.1f} | {other:.2f} |")
    print("\nThis machine has one disk and few cores: two ranks share both, so the run is bounded by the disk "
          "(the floor above) and the cores, not by the number of ranks; their figures show the distributed "
          "path's overhead (startup of a second process, the rendezvous, the steps' exchanges), not its scaling.")


def output_costs(shape: dict, shard_size: int) -> tuple[list[int], int]:
    """Each output shard's bytes read plus written in a three-input bf16 merge, and the total read."""
    a = SimpleNamespace(**shape)
    entries = [(name, torch.bfloat16, s) for name, s in tensor_shapes(a, range(a.layers), True, True).items()]
    groups = plan_shards(entries, shard_size)
    nbytes = [math.prod(s) * 2 for _, _, s in entries]
    return [sum((INPUTS + 1) * nbytes[i] for i in group) for group in groups], INPUTS * sum(nbytes)


def model_tables(a) -> None:
    bandwidth = a.node_gbps * 1e9
    print(f"# Distributed merges of Llama-3-70B and Llama-3.1-405B: a scaling model\n\n"
          f"`python bench/bench_distributed.py --model --node-gbps {a.node_gbps:g}` (no merge run: the engine's "
          f"plan_shards and assign_shards on the published shapes). Three bf16 inputs, output bf16; "
          f"{RANKS_PER_NODE} ranks per node; cost of a shard = bytes read + written. Expected time = the busiest "
          f"node's bytes / {a.node_gbps:g} GB/s per node (its disk or network share), assuming the shared "
          "filesystem's aggregate bandwidth is not the limit (nodes x per-node bandwidth); compute is not "
          "counted (on GPUs it is far below the I/O).\n")
    for name, shape in MODELS.items():
        for shard_size in SHARD_SIZES:
            costs, read = output_costs(shape, shard_size)
            total = sum(costs)
            floor = total / bandwidth
            print(f"## {name}, --out-shard-size {shard_size / 1e9:g}B: {len(costs)} shards, {read / 1e9:.0f} GB "
                  f"read, {(total - read) / 1e9:.0f} GB written; single-node I/O floor {floor:.0f} s "
                  f"({floor / 60:.1f} min)\n")
            print("| nodes | ranks | ranks with work | GB per rank: mean / max | balance (max/mean) | "
                  "busiest node GB | expected s | speed-up over 1 node |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for nodes in NODES:
                ranks = nodes * RANKS_PER_NODE
                owner = assign_shards(costs, ranks, [r // RANKS_PER_NODE for r in range(ranks)])
                loads = [0] * ranks
                for cost, rank in zip(costs, owner):
                    loads[rank] += cost
                node_loads = [sum(loads[n * RANKS_PER_NODE:(n + 1) * RANKS_PER_NODE]) for n in range(nodes)]
                seconds = max(node_loads) / bandwidth
                print(f"| {nodes} | {ranks} | {sum(x > 0 for x in loads)} | {total / ranks / 1e9:.1f} / "
                      f"{max(loads) / 1e9:.1f} | {balance(costs, owner, ranks):.2f} | {max(node_loads) / 1e9:.0f} | "
                      f"{seconds:.0f} | {floor / seconds:.1f} |")
            print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/merge_engine_bench", help="folder for models and outputs")
    for name, default in SHAPE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--small", action="store_true", help=f"a tiny model, to check the script: {TINY}")
    p.add_argument("--out-shard-size", type=int, default=300 * 10**6, help="output shard bytes (default 300M)")
    p.add_argument("--model", action="store_true", help="print the 70B/405B scaling model instead of measuring")
    p.add_argument("--node-gbps", type=float, default=2.0, help="with --model: I/O bandwidth per node, GB/s")
    a = p.parse_args()
    if a.model:
        return model_tables(a)
    if a.small:
        vars(a).update(TINY, out_shard_size=min(a.out_shard_size, 3 * 10**6))
    start = time.perf_counter()
    measure(a)
    print(f"\n({time.perf_counter() - start:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
