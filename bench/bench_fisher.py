"""Benchmark of the Fisher kernels against the machine's copy bandwidth and the PyTorch reference,
measured in the same run.

    python bench/bench_fisher.py [--sizes 16M,64M] [--experts 2,4,8] [--device cpu|cuda]

fisher_merge reads K params (bf16) and K Fishers (--fisher-dtype) and writes one output;
accumulate_fisher reads a Fisher (fp32) and a gradient (bf16) and writes the Fisher. Effective
bandwidth = those bytes / time: both ops are memory-bound, so the copy bandwidth is their ceiling.
Times are the best of --repeat runs after one warm-up run.
"""
from __future__ import annotations

import argparse

import torch
from common import BACKENDS, best_time, copy_bandwidth, kernel_backend, machine, parse_count

from merge_engine.ops.fisher import _accumulate_with, _merge_with, accumulate_fisher_reference, fisher_merge_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def row(op, n, k, nbytes, t, tr, ceiling):
    gbps = nbytes / t / 1e9
    print(f"| {op} | {n // 2**20}M | {k} | {t * 1e3:.1f} | {gbps:.2f} | {100 * gbps / ceiling:.0f}% | "
          f"{tr * 1e3:.1f} | {tr / t:.1f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16M,64M")
    p.add_argument("--experts", default="2,4,8")
    p.add_argument("--fisher-dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="GPU kernels to time")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    backend = kernel_backend(device, "fisher", args.backend)
    fisher_dtype = DTYPES[args.fisher_dtype]
    ceiling = copy_bandwidth(device, args.repeat)
    print(f"device: {machine(device)}; torch {torch.__version__}; backend: {getattr(backend, '__name__', 'none')}")
    print(f"measured copy bandwidth: {ceiling:.2f} GB/s; params bf16, Fishers {args.fisher_dtype}\n")
    print("| op | elements | K | kernel ms | kernel GB/s | % of copy | reference ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for n in map(parse_count, args.sizes.split(",")):
        fisher = torch.rand(n, generator=gen).to(device)
        grad = torch.randn(n, generator=gen).to(torch.bfloat16).to(device)
        t = best_time(lambda: _accumulate_with(backend, fisher, grad, 0.5), device, args.repeat)
        tr = best_time(lambda: accumulate_fisher_reference(fisher, grad, 0.5), device, args.repeat)
        row("accumulate_fisher", n, 1, n * (4 + 2 + 4), t, tr, ceiling)
        for k in map(int, args.experts.split(",")):
            params = [torch.randn(n, generator=gen).to(torch.bfloat16).to(device) for _ in range(k)]
            fishers = [torch.rand(n, generator=gen).to(fisher_dtype).to(device) for _ in range(k)]
            call = (params, fishers, [1.0 / k] * k, [1e-6] + [0.0] * (k - 1))
            t = best_time(lambda: _merge_with(backend, *call), device, args.repeat)
            tr = best_time(lambda: fisher_merge_reference(*call), device, 1)
            nbytes = k * n * (2 + fisher_dtype.itemsize) + n * 2
            row("fisher_merge", n, k, nbytes, t, tr, ceiling)
            del params, fishers


if __name__ == "__main__":
    main()
