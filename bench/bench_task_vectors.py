"""Benchmark of the fused task-vector kernels (TIES, DARE-TIES) against the machine's copy bandwidth
and the PyTorch reference (argsort-based, as common merge tools do it), measured in the same run.

    python bench/bench_task_vectors.py [--sizes 16M,64M] [--experts 2,4,8] [--device cpu|cuda] [--backend auto|cuda|triton]

Effective bandwidth = bytes of the minimal algorithm (read the base and K experts once, write the
output once) / time. The kernel writes into one output buffer reused across calls, as the engine's
buffer pool makes it do (fresh memory would add the kernel's page zeroing, which the copy ceiling does
not pay either). The ties_no_trim rows run TIES without the magnitude trim: the fused pass alone,
so the ties row minus it is the cost of the exact select. Kernel times are the best of --repeat runs after one warm-up run; the (slow)
reference's, the best of 2 after one warm-up (its time drifts between runs more than the kernel's).
"""
from __future__ import annotations

import argparse

import torch
from common import BACKENDS, best_time, copy_bandwidth, kernel_backend, machine, parse_count

from merge_engine.ops.consensus import _merge_with, merge_task_vectors_reference

METHODS = {"ties": dict(sparsify="magnitude", consensus=True, normalize=True),
           "dare_ties": dict(sparsify="random", consensus=True, normalize=False, rescale=True),
           # TIES without the trim: the fused pass alone, so ties - this = the exact select's cost
           "ties_no_trim": dict(sparsify="", consensus=True, normalize=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16M,64M")
    p.add_argument("--experts", default="2,4,8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="GPU kernels to time")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--reference-max", default="16M",
                   help="largest size at which the (slow) reference is also timed (all K); above it, K=2 only")
    args = p.parse_args()
    device = torch.device(args.device)
    backend = kernel_backend(device, "task_vectors", args.backend)
    name = getattr(backend, "__name__", "none")
    ceiling = copy_bandwidth(device, args.repeat)
    print(f"device: {machine(device)}; torch {torch.__version__}; backend: {name}")
    print(f"measured copy bandwidth: {ceiling:.2f} GB/s\n")
    print("| method | elements | K | kernel s | kernel GB/s | % of copy | reference s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for n in map(parse_count, args.sizes.split(",")):
        for k in map(int, args.experts.split(",")):
            base = torch.randn(n, generator=gen).to(torch.bfloat16)
            experts = [(base.float() + 0.01 * torch.randn(n, generator=gen)).to(torch.bfloat16) for _ in range(k)]
            base, experts = base.to(device), [e.to(device) for e in experts]
            nbytes = (k + 2) * n * base.element_size()
            out = torch.zeros_like(base)  # touched once: the pages exist before the timed calls
            for method, kw in METHODS.items():
                call = dict(weights=[1.0 / k] * k, densities=[0.2] * k, tensor_name="w", **kw)
                into = out if device.type == "cpu" else None  # the C++ kernel takes out; the GPU ones allocate
                t = best_time(lambda: _merge_with(backend, base, experts, **call, out=into), device, args.repeat)
                gbps = nbytes / t / 1e9
                ref = "-"
                speedup = "-"
                if n <= parse_count(args.reference_max) or k == 2:
                    tr = best_time(lambda: merge_task_vectors_reference(base, experts, **call), device, 2)
                    ref, speedup = f"{tr:.3f}", f"{tr / t:.1f}x"
                print(f"| {method} | {n // 2**20}M | {k} | {t:.3f} | {gbps:.2f} | {100 * gbps / ceiling:.0f}% "
                      f"| {ref} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
