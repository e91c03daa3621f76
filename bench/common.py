"""Helpers shared by the kernel benchmarks: the backend to time, best-of-n timing, the machine's copy
bandwidth (the ceiling a memory-bound kernel is compared with), and a one-line machine description.

Importing this module opts the benchmark's process into the engine's process settings, as the
`merge-engine` command does (huge pages for torch's large tensors, freed heap memory kept:
merge_engine/runtime.py), before torch allocates anything large: the kernels are timed as the
command runs them. Without it, the 64M-element TIES kernel with 8 experts took 0.41-0.49 s instead of
0.35 s on an AMD EPYC VM (its inputs faulted in 4 KB pages)."""
from __future__ import annotations

import platform
import time

from merge_engine.runtime import tune_process_for_merging

tune_process_for_merging()  # before torch's first large allocation (it reads THP_MEM_ALLOC_ENABLE then)

import torch  # noqa: E402

from merge_engine.ops import backends  # noqa: E402

BACKENDS = ("auto", "cuda", "triton")


def kernel_backend(device: torch.device, family: str, choice: str = "auto"):
    """The kernels a benchmark times: on CPU the C++ extension; on a GPU the engine's choice (auto:
    CUDA, else Triton) or the one asked for, so that a GPU session can time both."""
    if device.type == "cpu":
        return backends.cpu_extension()
    if choice == "cuda":
        return backends.cuda_extension()
    if choice == "triton":
        return backends.triton_backend(family)
    return backends.gpu_backend(family)


def parse_count(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def best_time(fn, device: torch.device, repeat: int) -> float:
    return interleaved_best([fn], device, repeat)[0]


def interleaved_best(fns, device: torch.device, repeat: int) -> list[float]:
    """Best seconds of each function over `repeat` rounds after a warm-up round, the functions taking
    turns in each round, so that a change in the shared machine's load hits them alike."""
    best = [float("inf")] * len(fns)
    for round_ in range(repeat + 1):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device, repeat: int) -> float:
    """GB/s of a large buffer copy (bytes read + bytes written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / best_time(lambda: dst.copy_(src), device, repeat) / 1e9


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {torch.get_num_threads()} threads"
