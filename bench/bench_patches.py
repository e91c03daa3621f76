"""Weight patches (merge_engine.patches): their size and speed on a ~1.1B-parameter Llama, and what they do to
accuracy on the digits testbed.

    python bench/bench_patches.py                   # both parts; lora's SVDs (~5 s per 5632x2048 weight on one
                                                    # core: ~10 core-minutes) are its slowest step
    python bench/bench_patches.py --part size --storages bfloat16,int8,int4         # no lora
    python bench/bench_patches.py --part quality --seed 1                           # about 2 min on one core
    python bench/bench_patches.py --quick            # small shapes, few epochs: a smoke run, not a measurement

Part "size": bench_merge.py's generated bf16 models in --work (reused when present, else generated: base + 3
experts, 8.8 GB); its expert1 is base + 0.002 N(0, 1) on every element, base weights ~ N(0, 0.02), so the
difference is dense and full rank: a worst case for a patch. Per storage (--storages; lora with --rank):
extract_patch(base, expert1) and apply_patches(base, [(patch, 1.0)], new folder), each in a fresh spawned
process on a cold page cache, timed around the call (wall, CPU, the process's peak RSS, other processes' load
in cores). Beside them in the same run: a full copy of the expert (shutil.copyfile of every file + fsync) and
each operation's I/O floor (bench_merge.io_floor with O_DIRECT reads: read its input files once, write + fsync
its output's size; measured just before it, for extract just after, once the patch's size is known).
GB/s = (bytes read + bytes written) / wall. The page cache is dropped before each timed run when permitted
(root; not with --quick).

Part "quality": bench_merge_quality.py's digits testbed (1797 8x8 digits as 64-token sentences, its 60/20/20
split by --seed; a 2-layer BERT, hidden 64, pretrained 16 epochs on every clean training digit). Corruption:
additive Gaussian noise on the pixel values (0..16), v -> clip(round(v + N(0, sigma^2)), 0, 16) per pixel
(--sigma, default 4), drawn once per image with a fixed seed; training and test images get independent draws.
A "robust" expert is fine-tuned from the base (every weight, classifier included; 10 epochs, Adam) on the noisy
training digits only. Patches (expert - base; fp32 weights) are extracted at several storages and layer
selections, applied in memory (apply_patches_in_memory on the loaded model) to the clean base at scales 0.5, 1,
1.5, and scored on the clean and the noisy test digits. Scale 0 is the base; float patches at scale 1 give the
expert's exact weights (their fixups), so they score as the expert does.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import transformers as tf
from bench_merge import (
    NOISE,
    SHAPE,
    busy_cpu_seconds,
    drop_caches,
    folder_bytes,
    generate_models_apart,
    io_floor,
    machine,
    safetensors_files,
)
from bench_merge_quality import accuracy, digit_tokenizer, load_tasks, train
from bench_tiers import copy_folder
from common import machine as cpu_line

from merge_engine.patches import Selection, apply_patches, apply_patches_in_memory, extract_patch
from merge_engine.patches.select import layer_of

QUICK_SHAPE = {"layers": 2, "hidden": 256, "intermediate": 704, "vocab": 4096, "heads": 32, "kv_heads": 4}
SCALES = (0.5, 1.0, 1.5)
QUALITY_PATCHES = [  # (storage, selection, lora rank)
    ("float32", Selection(), None), ("bfloat16", Selection(), None), ("int8", Selection(), None),
    ("int4", Selection(), None), ("lora", Selection(), 4), ("lora", Selection(), 16),
    ("int8", Selection(first_layers=1), None), ("int8", Selection(first_layers=1, outside_layers=True), None),
    ("int8", Selection(top_norm=0.5, outside_layers=True), None)]


def commit() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def all_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


# ---- part 1: size and speed ----

def spawned() -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def measured(shared, cold: bool, threads: int | None, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh spawned process (so its peak RSS is its own; or in the `shared` one) with
    `threads` torch threads (None: torch's default): (result, wall s, CPU s, peak RSS bytes, other processes' load
    in cores), timed around the call."""
    if cold:
        drop_caches()
    if shared:
        return shared.submit(_measure, threads, fn, args, kwargs).result()
    with spawned() as pool:
        return pool.submit(_measure, threads, fn, args, kwargs).result()


def _measure(threads, fn, args, kwargs):
    if threads:
        torch.set_num_threads(threads)
    before, busy, start = resource.getrusage(resource.RUSAGE_SELF), busy_cpu_seconds(), time.perf_counter()
    result = fn(*args, **kwargs)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, wall, cpu, after.ru_maxrss * 1024, max(0.0, busy_cpu_seconds() - busy - cpu) / wall


def floor(cold: bool, inputs: list[str], out_bytes: int, scratch: str) -> float:
    if cold:
        drop_caches()
    try:
        return io_floor(inputs, out_bytes, scratch, direct=True)
    except OSError:  # a filesystem without O_DIRECT (tmpfs)
        return io_floor(inputs, out_bytes, scratch)


def size_part(a) -> None:
    with spawned() if a.quick else contextlib.nullcontext() as shared:  # --quick: one process (torch imported once)
        size_rows(a, shared)


def size_rows(a, shared) -> None:
    shape = {k: getattr(a, k) or (QUICK_SHAPE if a.quick else SHAPE)[k] for k in SHAPE}
    s = argparse.Namespace(**shape)
    root = os.path.join(os.path.abspath(a.work), f"llama-L{s.layers}-H{s.hidden}-I{s.intermediate}-V{s.vocab}")
    t0 = time.perf_counter()
    base, tuned = generate_models_apart(s, root)[:2]
    print(f"models ready in {root} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    cold = not a.quick and drop_caches()
    threads = a.threads or (1 if a.quick else None)
    ckpt = folder_bytes(tuned)
    scratch, out = os.path.join(root, "scratch.bin"), os.path.join(root, "patch_out")
    rows = []

    def row(label, storage, inputs, written, timing, io, extra=("-",) * 3):
        _, wall, cpu, rss, other = timing
        gbps = (sum(map(os.path.getsize, inputs)) + written) / wall / 1e9
        rows.append((label, storage, f"{written / 1e6:,.1f}", *extra, f"{wall:.1f}", f"{gbps:.2f}", f"{io:.1f}",
                     f"{wall / io:.2f}", f"{cpu:.0f}", f"{rss / 1e9:.2f}", f"{other:.2f}"))

    shutil.rmtree(out, ignore_errors=True)
    io = floor(cold, safetensors_files(tuned), ckpt, scratch)
    copy = measured(shared, cold, threads, copy_folder, tuned, out)
    row("copy of the expert (+ fsync)", "-", safetensors_files(tuned), all_bytes(tuned), copy, io)
    shutil.rmtree(out)
    for storage in a.storages.split(","):
        patch = os.path.join(root, f"patch_{storage}")
        shutil.rmtree(patch, ignore_errors=True)
        inputs = safetensors_files(base) + safetensors_files(tuned)
        timing = measured(shared, cold, threads, extract_patch, base, tuned, patch, storage=storage,
                          rank=a.rank if storage == "lora" else None)
        report, size = timing[0], all_bytes(patch)
        fixups = sum(r.fixups for r in report.rows)
        worst = max(r.relative_error for r in report.rows)
        row("extract", storage, inputs, size, timing, floor(cold, inputs, size, scratch),
            (f"{100 * size / ckpt:.1f}", f"{fixups:,}", f"{worst:.3g}"))
        inputs = safetensors_files(base) + safetensors_files(patch)
        io = floor(cold, inputs, ckpt, scratch)
        row("apply x1 into a new folder", storage, inputs, all_bytes(base),
            measured(shared, cold, threads, apply_patches, base, [(patch, 1.0)], out), io)
        shutil.rmtree(out)
        if not a.keep:
            shutil.rmtree(patch)

    print(f"## Weight patches of a {os.path.basename(root)} (bf16) expert: extract and apply\n")
    cache = "NOT dropped (no permission): inputs may be warm"
    print(machine(cold).replace(cache, "not dropped (--quick)") if a.quick else machine(cold))
    print(f"- merge_engine: commit {commit()}; full checkpoint {ckpt / 1e9:.2f} GB ({ckpt:,} bytes); expert = base "
          f"+ {NOISE} N(0, 1) on every element (dense, full rank); lora: rank {a.rank} per linear weight in the "
          "layers and the head (embeddings and norms left out)")
    where = "one process for all (--quick: peak RSS is cumulative)" if shared else "a fresh process"
    print(f"- torch threads: {threads or torch.get_num_threads()}; wall: around the call, in {where}; I/O floor: "
          "O_DIRECT read of the operation's input files, then write + fsync of its output's size, measured just "
          "before the operation (extract: just after, with the patch's size); GB/s: (bytes read + bytes written) / "
          "wall\n")
    print("| operation | storage | output MB | % of checkpoint | fixups | worst rel. error | wall s | GB/s | "
          "I/O floor s | x floor | CPU s | peak RSS GB | other load, cores |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


# ---- part 2: quality on the digits testbed ----

def corrupt(ids: torch.Tensor, first_pixel: int, sigma: float, seed: int) -> torch.Tensor:
    """The images of token rows [CLS] v.. v.. [SEP] with v -> clip(round(v + N(0, sigma^2)), 0, 16) per pixel."""
    pixels = (ids[:, 1:-1] - first_pixel).float()
    noise = sigma * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    out = ids.clone()
    out[:, 1:-1] = (pixels + noise).round().clamp(0, 16).long() + first_pixel
    return out


def quality_part(a) -> None:
    began = time.perf_counter()
    torch.set_num_threads(a.threads or 1)
    warnings.filterwarnings("ignore")
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    pretrain, finetune = (3, 2) if a.quick else (16, 10)
    tokenizer = digit_tokenizer()
    first_pixel = tokenizer.convert_tokens_to_ids("v0")
    tasks = load_tasks(tokenizer, a.seed)
    train_ids, train_labels, _ = tasks["pretrain"]["train"]  # every clean digit of the training split
    test_ids, test_labels = (torch.cat([tasks[t]["test"][i] for t in ("T1", "T2")]) for i in (0, 1))  # all digits
    tests = {"clean": test_ids, "noisy": corrupt(test_ids, first_pixel, a.sigma, a.seed + 2)}
    cfg = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=72, num_labels=10, pad_token_id=0,
                        initializer_range=0.2)  # as bench_merge_quality.py
    work = a.out or tempfile.mkdtemp(prefix="bench-patches-")
    base_dir, expert_dir = os.path.join(work, "base"), os.path.join(work, "robust")

    torch.manual_seed(a.seed)
    model = tf.BertForSequenceClassification(cfg)
    start = time.perf_counter()
    train(model, train_ids, train_labels, pretrain, 2e-3, a.seed)
    model.save_pretrained(base_dir)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, corrupt(train_ids, first_pixel, a.sigma, a.seed + 1), train_labels, finetune, 1e-3, a.seed + 1)
    model.save_pretrained(expert_dir)
    trained = time.perf_counter() - start

    def scores():
        return " | ".join(f"{100 * accuracy(model, ids, test_labels):.1f}" for ids in tests.values())

    print(f"## Robustness patches on the digits testbed (seed {a.seed}{', quick' if a.quick else ''})\n")
    print(f"- {cpu_line(torch.device('cpu'))}; torch {torch.__version__}; transformers {tf.__version__}; "
          f"merge_engine commit {commit()}; work folder {work}")
    print(f"- BERT (hidden 64, 2 layers) pretrained {pretrain} epochs on {len(train_ids)} clean training digits; "
          f"the robust expert fine-tuned {finetune} epochs from it on the same digits with Gaussian pixel noise "
          f"(sigma {a.sigma:g} on 0..16); test: {len(test_labels)} digits, clean and with fresh noise")
    print("- patches applied in memory to the clean base at each scale; accuracy (%) clean / noisy; scale 0 is "
          "the base row; rel. error: worst ||stored - d|| / ||d|| over the stored tensors\n")
    header = " | ".join(f"x{s:g} clean | x{s:g} noisy" for s in SCALES)
    print(f"| model | clean | noisy |\n|---|---:|---:|\n| robust expert (full fine-tune) | {scores()} |")
    model.load_state_dict(base_state)
    print(f"| base (pretrained; every patch at scale 0) | {scores()} |\n")
    print(f"| patch | tensors | % of checkpoint | fixups | rel. error | extract s | {header} |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * 2 * len(SCALES))
    for i, (storage, selection, rank) in enumerate(QUALITY_PATCHES):
        patch = os.path.join(work, "patches", f"{i}-{storage}")
        report = extract_patch(base_dir, expert_dir, patch, storage=storage, selection=selection, rank=rank,
                               overwrite=True)
        label = storage + (f" rank {rank}" if rank else "")
        if selection.by_layer:
            layers = sorted({layer_of(r.name) for r in report.rows} - {None})
            label += (f", first {selection.first_layers}" if selection.first_layers else
                      f", top-norm {selection.top_norm:g}") + f" (layers {', '.join(map(str, layers))})"
            label += " + outside the layers" if selection.outside_layers else " only"
        cells = []
        for scale in SCALES:
            model.load_state_dict(base_state)
            apply_patches_in_memory(model, [(patch, scale)])
            cells.append(scores())
        fixups = sum(r.fixups for r in report.rows)
        worst = max(r.relative_error for r in report.rows)
        print(f"| {label} | {len(report.rows)} | {100 * report.patch_bytes / report.checkpoint_bytes:.1f} | "
              f"{fixups:,} | {worst:.3g} | {report.seconds:.2f} | {' | '.join(cells)} |")
    print(f"\ntrain {trained:.1f} s; total {time.perf_counter() - began:.1f} s")
    if not a.out:
        shutil.rmtree(work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("size", "quality", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="small shapes and few epochs: a smoke run")
    p.add_argument("--work", default="/tmp/merge_engine_bench", help="size: folder for models and outputs "
                   "(bench_merge.py's; generated models are reused)")
    for name in SHAPE:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"size: model shape (default {SHAPE[name]})")
    p.add_argument("--storages", default="bfloat16,int8,int4,lora", help="size: comma-separated storages")
    p.add_argument("--rank", type=int, default=16, help="size: the lora storage's rank")
    p.add_argument("--keep", action="store_true", help="size: keep the patch folders in the work folder")
    p.add_argument("--seed", type=int, default=0, help="quality: data split, initialisation, noise")
    p.add_argument("--threads", type=int, help="torch threads (default: size: torch's default, 1 with --quick; "
                   "quality: 1, as the tiny model is overhead-bound: bench_merge_quality.py)")
    p.add_argument("--sigma", type=float, default=4.0, help="quality: the pixel noise's standard deviation (0..16)")
    p.add_argument("--out", help="quality: work folder (default: a temporary folder, removed at the end)")
    a = p.parse_args()
    if a.part in ("size", "all"):
        size_part(a)
    if a.part in ("quality", "all"):
        quality_part(a)


if __name__ == "__main__":
    main()
