"""Benchmark: `merge-engine pytorch` against mergekit-pytorch 0.1.5 on raw weight files, warm page cache, CPU.

The inputs are one shard of bench_merge.py's models (base and three experts; with --small a 162M-parameter
Llama's first shard, 119 MB each) taken as raw weight files. For each method: wall time, CPU time and peak RSS of
`python -m merge_engine pytorch CONFIG OUT -q` and `mergekit-pytorch CONFIG OUT`, processes of their own (start-up
included), the inputs read once beforehand; beside them the warm I/O floor (a plain read of the input files, a
direct write and fsync of the output's size). The outputs are compared tensor by tensor.

    python bench/bench_flat.py --small
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import (  # noqa: E402
    SHAPE,
    SMALL,
    folder_bytes,
    generate_models_apart,
    io_floor,
    open_tensors,
    read_files,
    run_merge,
    safetensors_files,
)

MERGEKIT_PYTORCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mergekit", "bin",
                                "mergekit-pytorch")
CONFIGS = {
    "linear": {"merge_method": "linear", "parameters": {"weight": [0.5, 0.3, 0.2]}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"weight": 0.3}},
    "ties": {"merge_method": "ties", "parameters": {"weight": 0.3, "density": 0.5}},
}


def write_config(method: str, files: list[str], path: str) -> str:
    config = {**CONFIGS[method], "dtype": "bfloat16", "models": [{"model": f} for f in files[1:]]}
    if method != "linear":
        config["base_model"] = files[0]
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def identical(ours: str, theirs: str, files: list[str], method: str) -> str:
    """identical, or how many tensors and elements differ; for TIES, how many of those sit where some expert's
    |delta| equals its cut-off exactly (a magnitude tie, which mergekit's unstable sort breaks arbitrarily)."""
    a, b = open_tensors(ours), open_tensors(theirs)
    if set(a) != set(b):
        return f"different tensor names ({len(set(a) ^ set(b))})"
    base, *experts = (safe_open(f, "pt") for f in files)
    tensors = elements = at_ties = 0
    for name in a:
        x, y = a[name].get_tensor(name), b[name].get_tensor(name)
        differ = x.view(torch.int16) != y.view(torch.int16)
        if not differ.any():
            continue
        tensors, elements = tensors + 1, elements + int(differ.sum())
        if method == "ties":
            w, tie = base.get_tensor(name), torch.zeros_like(differ)
            for e in experts:
                mag = (e.get_tensor(name) - w).abs().float()
                k = max(1, int(CONFIGS["ties"]["parameters"]["density"] * mag.numel()))
                tie |= mag == mag.reshape(-1).kthvalue(mag.numel() - k + 1).values
            at_ties += int((differ & tie).sum())
    if not tensors:
        return "identical"
    return (f"{tensors} of {len(a)} tensors differ, {elements} elements"
            + (f" ({at_ties} of them at a magnitude tie on a TIES cut-off)" if method == "ties" else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/merge_engine_bench", help="folder for models and outputs")
    p.add_argument("--small", action="store_true", help=f"the small model: {SMALL}")
    p.add_argument("--methods", default=",".join(CONFIGS))
    p.add_argument("--mergekit", default=MERGEKIT_PYTORCH, help="mergekit-pytorch executable")
    a = p.parse_args()
    vars(a).update(SMALL if a.small else SHAPE)
    root = os.path.join(os.path.abspath(a.work), f"llama-L{a.layers}-H{a.hidden}-I{a.intermediate}-V{a.vocab}")
    files = [safetensors_files(path)[0] for path in generate_models_apart(a, root)]
    rows = []
    for method in a.methods.split(","):
        config = write_config(method, files, os.path.join(root, f"flat-{method}.yml"))
        used = files if method != "linear" else files[1:]
        ours, theirs = os.path.join(root, f"flat-{method}-ours"), os.path.join(root, f"flat-{method}-theirs")
        read_files(used)
        engine = run_merge([sys.executable, "-m", "merge_engine", "pytorch", config, ours, "-q"], ours,
                           os.path.join(root, f"flat-{method}-ours.log"), warm=True)
        read_files(used)
        mergekit = run_merge([a.mergekit, config, theirs], theirs, os.path.join(root, f"flat-{method}-theirs.log"),
                             warm=True)
        read_files(used)
        floor = io_floor(used, folder_bytes(ours), os.path.join(root, "scratch.bin"), direct=False)
        rows.append([method, sum(map(os.path.getsize, used)), folder_bytes(ours), floor, engine, mergekit,
                     (ours, theirs)])
    for row in rows:  # after every timed run: a child inherits its parent's peak RSS, and comparing loads tensors
        row[-1] = identical(*row[-1], files, row[0])
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; inputs: the first shard "
          f"of Llama L{a.layers} H{a.hidden} I{a.intermediate} V{a.vocab} bf16 models, as raw files\n")
    print("| method | files read | read GB | written GB | warm floor s | merge-engine s | x floor | CPU s | peak RSS GB "
          "| mergekit-pytorch s | CPU s | peak RSS GB | x merge-engine | outputs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for method, read, written, floor, (wall, rss, cpu, _), (mk_wall, mk_rss, mk_cpu, _), same in rows:
        files_read = 3 if method == "linear" else 4
        print(f"| {method} | {files_read} | {read / 1e9:.2f} | {written / 1e9:.2f} | {floor:.2f} | {wall:.2f} | "
              f"{wall / floor:.2f} | {cpu:.1f} | {rss / 1e9:.2f} | {mk_wall:.2f} | {mk_cpu:.1f} | {mk_rss / 1e9:.2f} | "
              f"{mk_wall / wall:.1f} | {same} |")


if __name__ == "__main__":
    main()
