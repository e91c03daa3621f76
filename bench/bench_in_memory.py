"""Benchmark of merge_state_dicts (merge_engine.in_memory) against mergekit 0.1.5's function of the same name, on
the same state dicts, measured in the same run, next to the machine's copy bandwidth.

    python bench/bench_in_memory.py [--tensors 16] [--shape 2048x4096] [--models 3] [--methods linear,ties,...]
                                    [--mergekit PATH/TO/mergekit-yaml] [--repeat 3]

The models are a base and experts (base + seeded noise) of --tensors bf16 tensors each. Effective bandwidth =
bytes of the minimal algorithm (read every input once, write the output once) / seconds. Each function is timed
in its own process (mergekit's in its own Python, where mergekit is installed), best of --repeat calls after one
warm-up call, on inputs already in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import copy_bandwidth, machine
from safetensors.torch import save_file

METHODS = {"linear": {"weight": 1.0}, "task_arithmetic": {"weight": 0.5}, "ties": {"weight": 0.5, "density": 0.3},
           "slerp": {"t": 0.4}, "model_stock": {}}
TIMED = """
import json, sys, time, torch
from safetensors.torch import load_file
from {module} import merge_state_dicts
stored, (method, parameters, repeat, models) = load_file(sys.argv[1]), json.loads(sys.argv[2])
dicts = {{m: {{k.split("/", 1)[1]: v for k, v in stored.items() if k.startswith(m + "/")}} for m in models}}
best = float("inf")
for i in range(repeat + 1):
    start = time.perf_counter()
    merge_state_dicts(dicts, method, base=models[0], parameters=parameters)
    if i:
        best = min(best, time.perf_counter() - start)
print(best)
"""


def timed(python: str, module: str, path: str, method: str, models: list[str], repeat: int) -> float:
    """Best seconds of merge_state_dicts in a fresh process of `python` (module: where it comes from)."""
    slerp = method == "slerp"
    spec = json.dumps([method, METHODS[method], repeat, models[:2] if slerp else models])
    run = subprocess.run([python, "-c", TIMED.format(module=module), path, spec], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if run.returncode:
        raise RuntimeError(f"{python} {method}: {run.stderr.strip().splitlines()[-1]}")
    return float(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--shape", default="2048x4096")
    p.add_argument("--models", type=int, default=3, help="base + experts")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--mergekit", default=os.path.join(os.path.dirname(__file__), "..", ".venv-mergekit", "bin",
                                                      "mergekit-yaml"))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    shape = tuple(int(x) for x in args.shape.split("x"))
    models = [f"m{i}" for i in range(args.models)]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for t in range(args.tensors):
        base = torch.randn(shape, generator=gen)
        for i, m in enumerate(models):
            tensors[f"{m}/layer{t}.weight"] = (base + (0.01 * torch.randn(shape, generator=gen) if i else 0)).to(
                torch.bfloat16)
    per_model = sum(v.nbytes for k, v in tensors.items() if k.startswith("m0/"))
    mergekit_python = os.path.join(os.path.dirname(os.path.abspath(args.mergekit)), "python")
    ceiling = copy_bandwidth(torch.device("cpu"), args.repeat)
    print(f"device: {machine(torch.device('cpu'))}; torch {torch.__version__}; {args.models} models of "
          f"{args.tensors} bf16 tensors {args.shape} ({per_model / 1e6:.0f} MB each)")
    print(f"measured copy bandwidth: {ceiling:.2f} GB/s\n")
    print("| method | models | merge_engine s | GB/s | % of copy | mergekit s | mergekit x merge_engine |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "models.safetensors")
        save_file(tensors, path)
        del tensors
        for method in args.methods.split(","):
            n = 2 if method == "slerp" else args.models
            ours = timed(sys.executable, "merge_engine", path, method, models, args.repeat)
            gbps = (n + 1) * per_model / ours / 1e9
            theirs = (timed(mergekit_python, "mergekit.merge_methods.api", path, method, models, args.repeat)
                      if os.path.exists(mergekit_python) else None)
            shown = f"{theirs:.3f} | {theirs / ours:.1f}" if theirs else "- | -"
            print(f"| {method} | {n} | {ours:.3f} | {gbps:.2f} | {100 * gbps / ceiling:.0f}% | {shown} |")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
