"""Solve time of RegMean and BMM per linear module, next to the machine's matrix-product rate measured in
the same run (the solves are matrix products and a Cholesky factorisation).

    python bench/bench_regression.py [--dims 4096,11008] [--out 4096] [--experts 2] [--device cpu|cuda]

A module is W [out, d] with one Gram [d, d] per expert. RegMean forms S = sum_t G~_t and R = sum_t W_t G~_t
(K products of 2 out d^2 flops), factorises S (d^3 / 3) and solves (2 out d^2): the flop count below.
BMM adds lambda I and lambda W_anchor (same count). BMM tuning (merge_engine/tuning.py) factorises each
module once ("factorise": an fp64 eigendecomposition of S and two products), after which a trial costs
one [out, d] x [d, d] product per module ("trial"). Times are the best of --repeat runs.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import best_time, machine

from merge_engine.ops import regression
from merge_engine.tuning import factorise

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def matmul_rate(d: int, dtype: torch.dtype, device: torch.device, repeat: int) -> float:
    a = torch.randn(d, d, dtype=dtype, device=device)
    return 2 * d ** 3 / best_time(lambda: a @ a, device, repeat) / 1e9


def problem(out: int, d: int, experts: int, device: torch.device):
    gen = torch.Generator().manual_seed(d)
    weights = [torch.randn(out, d, generator=gen).to(device) for _ in range(experts)]
    grams = []
    for _ in range(experts):
        x = torch.randn(d + 64, d, generator=gen).to(device)  # more tokens than features: a full-rank Gram
        grams.append(x.T @ x)
    return weights, grams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="4096,11008")
    p.add_argument("--out", type=int, default=4096)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device: {machine(device)}; torch {torch.__version__}; W [{args.out}, d], {args.experts} experts\n")
    print("| d | solve dtype | matmul GFLOP/s | regmean s | regmean GFLOP/s | % of matmul | bmm s | factorise s | trial s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in map(int, args.dims.split(",")):
        weights, grams = problem(args.out, d, args.experts, device)
        anchor = sum(weights) / len(weights)
        flops = args.experts * 2 * args.out * d * d + d ** 3 / 3 + 2 * args.out * d * d
        began = time.perf_counter()
        system = factorise(weights, grams, anchor, False, torch.float32, torch.float32)
        factorised = time.perf_counter() - began
        trial = best_time(lambda: system.solve(0.5), device, args.repeat)
        for name, dtype in DTYPES.items():
            rate = matmul_rate(d, dtype, device, args.repeat)
            t = best_time(lambda: regression.regmean(weights, grams, 0.9, dtype), device, args.repeat)
            tb = best_time(lambda: regression.bmm(weights, grams, anchor, 0.5, dtype), device, args.repeat)
            gflops = flops / t / 1e9
            print(f"| {d} | {name} | {rate:.0f} | {t:.2f} | {gflops:.0f} | {100 * gflops / rate:.0f}% | {tb:.2f} | "
                  f"{factorised:.1f} | {trial:.3f} |", flush=True)


if __name__ == "__main__":
    main()
