"""Benchmark of the Gram accumulation against the machine's own matrix product, measured in the same run.

    python bench/bench_gram.py [--dims 1024,4096] [--tokens 4096] [--dtypes bfloat16,float32] [--device cpu|cuda]

Per shape and dtype: ops.accumulate_gram(gram, x) and mirror_upper_(gram) (together the whole cost
of a one-batch Gram; over many batches the mirror runs once, at the end), and torch.mm(x^T, x) on an
fp32 copy of x made beforehand (the full product, no upcast, no mask), the machine's own product
rate. GFLOP/s counts the full product, 2 T d^2, for both, so the op (accumulate + mirror), which
computes the upper triangle only, can pass the product's rate; "x mm" is the product's time over the
op's. Times are the best of --repeat rounds after a warm-up round, the three taking turns in each.
"other load" is the CPU time other processes used meanwhile, in cores (the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from common import BACKENDS, interleaved_best, kernel_backend, machine, parse_count

from merge_engine import ops
from merge_engine.ops.gram import _accumulate_with

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def busy_cpu_seconds() -> float:
    """CPU time used by every process on the machine since boot (/proc/stat, all but idle and iowait;
    as bench_merge.py)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def other_load(fn):
    """fn()'s result, and the cores other processes kept busy on average while it ran."""
    start, busy, own = time.perf_counter(), busy_cpu_seconds(), time.process_time()
    result = fn()
    others = (busy_cpu_seconds() - busy) - (time.process_time() - own)
    return result, max(0.0, others) / (time.perf_counter() - start)


def time_case(backend, d, tokens, dtype, device, repeat, gen):
    """Seconds of accumulate_gram (on `backend`, which --backend picks), of mirror_upper_ and of the matrix
    product, for one shape and dtype."""
    x = torch.randn(tokens, d, generator=gen).to(dtype).to(device)
    x32 = x.float()
    gram = torch.zeros(d, d, device=device)
    return interleaved_best([lambda: _accumulate_with(backend, gram, x, None), lambda: ops.mirror_upper_(gram),
                             lambda: torch.mm(x32.T, x32)], device, repeat)


def row(d, tokens, dtype, times, load):
    (t_acc, t_mirror, t_mm), flops = times, 2 * tokens * d * d
    t = t_acc + t_mirror
    print(f"| {d} | {tokens} | {dtype} | {t_acc * 1e3:.1f} | {t_mirror * 1e3:.1f} | {flops / t / 1e9:.1f} | "
          f"{t_mm * 1e3:.1f} | {flops / t_mm / 1e9:.1f} | {t_mm / t:.2f}x | {load:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="1024,4096")
    p.add_argument("--tokens", default="4096")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="GPU kernels to time")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    backend = kernel_backend(device, "gram", args.backend)
    print(f"device: {machine(device)}; torch {torch.__version__}; backend: {getattr(backend, '__name__', 'none')}\n")
    print("| d | tokens | dtype | accumulate_gram ms | mirror_upper_ ms | GFLOP/s | torch.mm fp32 ms | GFLOP/s | x mm | "
          "other load, cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    tokens = parse_count(args.tokens)
    for d in map(parse_count, args.dims.split(",")):
        for name in args.dtypes.split(","):
            row(d, tokens, name, *other_load(lambda: time_case(backend, d, tokens, DTYPES[name], device, args.repeat, gen)))


if __name__ == "__main__":
    main()
