"""Benchmark of the permute kernels against the machine's copy bandwidth and the PyTorch reference,
measured in the same run.

    python bench/bench_permute.py [--small] [--layers 8] [--key 0.05] [--device cpu|cuda] [--threads N]

Two bf16 stacks of --layers tensors, as an MLP's blocks lie: rows (gate/up-like [11008, 4096], a
block is a row, dim 0) and columns (down-like [4096, 11008], a block is a column, dim 1); --small
divides both sizes by 4. A key swaps a --key fraction of each stack's blocks in disjoint pairs,
across layers. Effective bandwidth = bytes moved / time, both ops being memory-bound (the copy
bandwidth is their ceiling):
- gather_blocks of layer 0: reads and writes one tensor (2 x its bytes), through the key's tables,
  and through random tables (every block from a random block of a random layer: no locality);
- swap_blocks_ with the key: reads and writes both blocks of every pair (2 x 2 x pairs x block bytes).
Times are the best of --repeat runs after one warm-up run.
"""
from __future__ import annotations

import argparse

import torch
from common import BACKENDS, best_time, copy_bandwidth, kernel_backend, machine

from merge_engine.ops.permute import _gather_with, _swap_with, gather_blocks_reference, swap_blocks_reference
from merge_engine.tiers.permutation import BlockPermutation

MLP = (11008, 4096)


def key_pairs(num_layers: int, n_blocks: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Disjoint swaps of a `fraction` of the num_layers x n_blocks blocks, int64 [M, 4]."""
    count = int(fraction * num_layers * n_blocks) // 2
    chosen = torch.randperm(num_layers * n_blocks, generator=gen)[:2 * count].view(2, count)
    return torch.stack([chosen[0] // n_blocks, chosen[0] % n_blocks, chosen[1] // n_blocks, chosen[1] % n_blocks], 1)


def key_tables(pairs: torch.Tensor, num_layers: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's (src_layer, src_block) tables of the key (merge_engine.tiers.permutation)."""
    swaps = [((la, ba), (lb, bb)) for la, ba, lb, bb in pairs.tolist()]
    key = BlockPermutation.from_swaps({"mlp_cols": swaps})
    src_layer, src_block = key.index_tables("mlp_up", num_layers, n_blocks)
    return src_layer[0], src_block[0]


def row(op, layout, shape, moved, nbytes, t, tr, ceiling):
    gbps = nbytes / t / 1e9
    print(f"| {op} | {layout} {shape[0]}x{shape[1]} | {moved} | {t * 1e3:.2f} | {gbps:.2f} | "
          f"{100 * gbps / ceiling:.0f}% | {tr * 1e3:.1f} | {tr / t:.1f}x |", flush=True)


def bench_stack(backend, device, layout, shape, dim, args, gen, ceiling):
    tensors = [torch.randn(shape, generator=gen).to(torch.bfloat16).to(device) for _ in range(args.layers)]
    n_blocks, tensor_bytes = shape[dim], tensors[0].numel() * tensors[0].element_size()
    pairs = key_pairs(args.layers, n_blocks, args.key, gen)
    shuffle = torch.randperm(args.layers * n_blocks, generator=gen)[:n_blocks]
    for name, (src_layer, src_block) in (("key", key_tables(pairs, args.layers, n_blocks)),
                                         ("random", (shuffle // n_blocks, shuffle % n_blocks))):
        tables = (src_layer.to(device), src_block.to(device))
        t = best_time(lambda: _gather_with(backend, tensors, 0, *tables, dim, 1), device, args.repeat)
        tr = best_time(lambda: gather_blocks_reference(tensors, 0, *tables, dim, 1), device, args.repeat)
        moved = int(((tables[0] != 0) | (tables[1] != torch.arange(n_blocks, device=device))).sum())
        row(f"gather_blocks ({name} tables)", layout, shape, f"{moved} of {n_blocks}", 2 * tensor_bytes, t, tr, ceiling)
    pairs = pairs.to(device)
    t = best_time(lambda: _swap_with(backend, tensors, pairs, dim, 1), device, args.repeat)
    tr = best_time(lambda: swap_blocks_reference(tensors, pairs, dim, 1), device, args.repeat)
    row(f"swap_blocks_ ({args.key:.0%} key)", layout, shape, f"{2 * len(pairs)} of {args.layers * n_blocks}",
        2 * 2 * len(pairs) * tensor_bytes // n_blocks, t, tr, ceiling)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tensors of a quarter of each size")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--key", type=float, default=0.05, help="fraction of the blocks a key swaps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="GPU kernels to time")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backend = kernel_backend(device, "permute", args.backend)
    ceiling = copy_bandwidth(device, args.repeat)
    neurons, hidden = (n // 4 for n in MLP) if args.small else MLP
    print(f"device: {machine(device)}; torch {torch.__version__}; backend: {getattr(backend, '__name__', 'none')}")
    print(f"measured copy bandwidth: {ceiling:.2f} GB/s; {args.layers} layers of bf16 tensors, one-row / one-column "
          f"blocks\n")
    print("| op | stack | blocks moved | kernel ms | kernel GB/s | % of copy | reference ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    bench_stack(backend, device, "rows", (neurons, hidden), 0, args, gen, ceiling)
    bench_stack(backend, device, "columns", (hidden, neurons), 1, args, gen, ceiling)


if __name__ == "__main__":
    main()
