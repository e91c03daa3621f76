"""Tier keys: applying a key to a checkpoint on disk, and the cost of a keyed forward without rewriting weights.

    python bench/bench_tiers.py                 # TinyLlama-1.1B shape, bf16 (~2.2 GB per copy; ~13 min on 2 cores)
    python bench/bench_tiers.py --small         # a quick check (~70 MB; in memory, the 180M shape alone; about a minute)

(i) Applying a key (--fraction of the swappable parameters, default 5%) to a Llama-shaped bf16 checkpoint made by
merge_engine.demo.make_synthetic_llama in --work (reused when present):
- copy: every file of the checkpoint copied once into a new folder (shutil.copyfile) and fsynced, the floor for
  any tool that writes a keyed copy;
- apply, streaming: apply_key into a new folder (reads and writes every byte; fsynced at commit);
- apply, in place / remove, in place: apply_key_in_place, then remove_key_in_place, on that copy (journal fsynced,
  then only the moved ranges rewritten and fsynced).
Every operation runs twice: page cache cold (its input files fsynced, then evicted with posix_fadvise(DONTNEED):
only this benchmark's files, not the whole cache), then warm (its input read once just before).

(ii) A small Llama (transformers, random init, GQA) on CPU, random tokens: forward (no grad) and forward+backward
of the plain model, of a KeyedModel in the public configuration (hooks installed, idle) and in the keyed one
(method "rebuild": keyed weights built through index maps in every forward; method "swap": the Parameters' blocks
moved in place on entering the configuration and back on leaving it, that move timed with each run). Best of
--repeat rounds (see forward_times).

(iii) Keying a model in memory, on the published benchmark's GPT-Neo shapes (the reference's
scripts/keys/benchmark_permutation_speed.py: 180M, 650M, 1B; bf16; a --fraction key of the swappable parameters):
apply_key_in_memory (the swap kernels) against the reference's apply_permutation restated (a swap plan built
once: index tensors per layer pair; then per op a clone of one side and two indexed copies), on the same tensors,
alternating, best of --repeat. Only the keyed layers' tensors are built (q/k/v/out, c_fc with bias, c_proj).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

import torch
import transformers as tf
from common import machine

from merge_engine.demo import make_synthetic_llama
from merge_engine.tiers import (
    KeyedModel,
    apply_key,
    apply_key_in_memory,
    apply_key_in_place,
    generate_key,
    key_report,
    remove_key_in_place,
)

SHAPE = {"layers": 22, "hidden": 2048, "intermediate": 5632, "vocab": 32000, "heads": 32, "kv_heads": 4}  # TinyLlama
# 8 heads of 64 in 8 layers: a 5% key then holds head swaps as well as MLP-column swaps
SMALL = {"layers": 8, "hidden": 512, "intermediate": 1408, "vocab": 8192, "heads": 8, "kv_heads": 8}
FORWARD = {"layers": 8, "hidden": 512, "intermediate": 1408, "vocab": 8192, "heads": 8, "kv_heads": 8}
SECRET = "bench_tiers secret"
# the reference's benchmark shapes: (layers, heads, hidden, mlp)
PUBLISHED_SHAPES = {"180M": (12, 12, 768, 2368), "650M": (16, 16, 1344, 6456), "1B": (16, 16, 1664, 13824)}
CHUNK = 64 << 20


def checkpoint(a, work: str) -> str:
    """The generated checkpoint for the shape in a (written to a temporary name, renamed once complete)."""
    path = os.path.join(work, f"llama-L{a.layers}-H{a.hidden}-I{a.intermediate}-V{a.vocab}-KV{a.kv_heads}")
    if not os.path.isdir(path):
        start = time.perf_counter()
        partial = path + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        make_synthetic_llama(partial, a.layers, a.hidden, a.intermediate, a.vocab, torch.bfloat16, heads=a.heads,
                             kv_heads=a.kv_heads)
        os.rename(partial, path)
        print(f"generated {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def files(folder: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(folder, "*")) if os.path.isfile(p))


def folder_bytes(folder: str) -> int:
    return sum(map(os.path.getsize, files(folder)))


def set_cache(folder: str, state: str) -> None:
    """cold: flush and evict the folder's files from the page cache; warm: read them once."""
    buf = bytearray(CHUNK)
    for path in files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            if state == "cold":
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.readv(fd, [buf]):
                    pass
        finally:
            os.close(fd)


def copy_folder(src: str, dst: str) -> None:
    os.makedirs(dst)
    for path in files(src):
        out = os.path.join(dst, os.path.basename(path))
        shutil.copyfile(path, out)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def apply_rows(model: str, key, work: str) -> list[tuple[str, str, float]]:
    """(operation, cache state, seconds) of each operation, cold then warm; outputs deleted afterwards."""
    copy, keyed = os.path.join(work, "copy"), os.path.join(work, "keyed")
    rows = []
    for state in ("cold", "warm"):
        for folder in (copy, keyed):
            shutil.rmtree(folder, ignore_errors=True)
        steps = [("copy (shutil.copyfile + fsync)", model, lambda: copy_folder(model, copy)),
                 ("apply, streaming", model, lambda: apply_key(model, key, keyed)),
                 ("apply, in place", copy, lambda: apply_key_in_place(copy, key)),
                 ("remove, in place", copy, lambda: remove_key_in_place(copy, key))]
        for label, source, step in steps:
            set_cache(source, state)
            rows.append((label, state, timed(step)))
    for folder in (copy, keyed):
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def print_apply(a, work: str) -> None:
    model = checkpoint(a, work)
    with open(os.path.join(model, "config.json")) as f:
        key = generate_key(json.load(f), SECRET, a.fraction)
    report = key_report(model, key)
    size = folder_bytes(model)
    rows = apply_rows(model, key, work)
    copy_s = {state: s for label, state, s in rows if label.startswith("copy")}
    print(f"## Applying a {100 * a.fraction:g}% key to a {report.total_params / 1e6:,.0f}M-parameter Llama (bf16)\n")
    print(f"- checkpoint: {model}, {size / 1e9:.2f} GB in {len(files(model))} files "
          f"(layers {a.layers}, hidden {a.hidden}, intermediate {a.intermediate}, vocab {a.vocab}, "
          f"{a.heads} heads / {a.kv_heads} KV heads)")
    print(f"- key: {len(key.attn_heads)} attention swaps (a KV group each), {len(key.mlp_cols)} MLP-column swaps; "
          f"{report.params_moved:,} parameters moved ({100 * report.params_moved / report.total_params:.2f}% of the "
          f"model, {2 * report.params_moved / 1e6:.0f} MB)")
    print(f"- disk: {filesystem(work)}; page cache: cold = the operation's input files fsynced and evicted "
          "(posix_fadvise DONTNEED), warm = read once just before\n")
    print("| operation | page cache | s | x copy |")
    print("|---|---|---:|---:|")
    for label, state, seconds in rows:
        print(f"| {label} | {state} | {seconds:.2f} | {seconds / copy_s[state]:.2f} |")
    print()


def filesystem(path: str) -> str:
    """The mount holding path: device and type (from /proc/mounts)."""
    path, best = os.path.realpath(path), ("?", "?", "")
    with open("/proc/mounts") as f:
        for line in f:
            device, mount, fstype = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[2]):
                best = (device, fstype, mount)
    return f"{best[0]} ({best[1]}) mounted at {best[2]}"


def print_forward(a) -> None:
    s = FORWARD
    cfg = tf.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=a.length)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, s["vocab"], (a.batch, a.length), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            model(ids)

    def forward_backward():
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    forward_backward()  # warm-up
    key = generate_key(cfg.to_dict(), SECRET, a.fraction)
    times, keyed = forward_times(model, key, (forward, forward_backward), a.repeat)
    moves = swap_move_seconds(model, key, a.repeat)
    plain = times["plain model"]
    params = sum(p.numel() for p in model.parameters())
    touched = sum(model.get_parameter(n).numel() for n in keyed.touched)
    print(f"## Keyed forward overhead: Llama {params / 1e6:.1f}M parameters (hidden {s['hidden']}, {s['layers']} "
          f"layers, {s['heads']} heads / {s['kv_heads']} KV heads, vocab {s['vocab']}), fp32, batch {a.batch} x "
          f"{a.length} tokens, {100 * a.fraction:g}% key\n")
    print(f"- {machine(torch.device('cpu'))}; torch {torch.__version__}, transformers {tf.__version__}; best of "
          f"{a.repeat} rounds, the configurations taking turns in each")
    print(f"- keyed weights built per keyed forward: {len(keyed.touched)} tensors, {touched / 1e6:.1f}M elements "
          f"({100 * touched / params:.0f}% of the model), kept for backward with autograd on\n")
    print("| configuration | forward ms | x plain | forward+backward ms | x plain |")
    print("|---|---:|---:|---:|---:|")
    for name, (fwd, fwd_bwd) in times.items():
        print(f"| {name} | {1e3 * fwd:.1f} | {fwd / plain[0]:.2f} | {1e3 * fwd_bwd:.1f} | {fwd_bwd / plain[1]:.2f} |")
    print(f"\nMethod swap runs the plain model's forward and backward on the Parameters themselves (the same ops "
          f"on tensors of the same shapes), so its cost over the plain model is the moves alone: entering and "
          f"leaving the keyed configuration, Parameters and their gradients, took {1e3 * moves:.1f} ms (best of "
          f"{a.repeat}), {100 * moves / plain[1]:.1f}% of the plain forward+backward and {100 * moves / plain[0]:.1f}% "
          "of the plain forward.\n")


def swap_move_seconds(model, key, repeat: int) -> float:
    """Best seconds of entering and leaving the keyed configuration with method "swap", gradients present."""
    swapping = KeyedModel(model, key, method="swap")
    model(**{"input_ids": torch.zeros(1, 4, dtype=torch.long)}).logits.sum().backward()  # gradients to move
    best = min(timed(lambda: in_configuration(swapping, lambda: None)) for _ in range(repeat))
    model.zero_grad(set_to_none=True)
    return best


def forward_times(model, key, runs, repeat: int) -> tuple[dict[str, list[float]], KeyedModel]:
    """Best seconds of each run: plain model (no hooks), KeyedModel public and keyed with method "rebuild" (hooks
    put on before the turn and taken off after it), keyed with method "swap" (entering and leaving the
    configuration timed with each run). All take turns in every round, in an order rotated each round; a turn
    runs once untimed, then twice timed, so that what the previous turn left in caches and the allocator, and a
    shared machine's changing load, weigh on all alike."""
    swapping = KeyedModel(model, key, method="swap")
    labels = ["plain model", "KeyedModel, public", "KeyedModel, keyed (rebuild)",
              "KeyedModel, keyed (swap, moves included)"]
    best = {label: [float("inf")] * len(runs) for label in labels}
    keyed = swapping
    for r in range(repeat):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            if label in labels[1:3]:
                keyed = KeyedModel(model, key, configuration="keyed" if label == labels[2] else "public")
            for i, run in enumerate(runs):
                call = (lambda: in_configuration(swapping, run)) if label == labels[3] else run
                call()
                best[label][i] = min(best[label][i], timed(call), timed(call))
            if label in labels[1:3]:
                keyed.remove()
    return best, keyed


def in_configuration(keyed: KeyedModel, run) -> None:
    with keyed.configuration("keyed"):
        run()


def published_layers(shape: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
    """The keyed tensors of a GPT-Neo of the shape, bf16, random (names as transformers saves them)."""
    layers, _, hidden, mlp = shape
    gen = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(layers):
        p = f"transformer.h.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"attn.attention.{name}.weight"] = torch.randn(hidden, hidden, generator=gen).bfloat16()
        out[p + "mlp.c_fc.weight"] = torch.randn(mlp, hidden, generator=gen).bfloat16()
        out[p + "mlp.c_fc.bias"] = torch.randn(mlp, generator=gen).bfloat16()
        out[p + "mlp.c_proj.weight"] = torch.randn(hidden, mlp, generator=gen).bfloat16()
    return out


def published_apply(state: dict[str, torch.Tensor], key, head_dim: int, plan=None):
    """The reference's apply_permutation on GPT-Neo, restated over a state dict: swaps batched per layer pair into
    index tensors (its build_swap_plan, done once and passed back in), then per op: tmp = a[idx_a].clone();
    a[idx_a] = b[idx_b]; b[idx_b] = tmp, for rows (q/k/v, c_fc and its bias) and columns (out_proj, c_proj)."""
    if plan is None:
        plan = []
        for kind, width in (("attn_heads", head_dim), ("mlp_cols", 1)):
            pairs: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
            for (la, a), (lb, b) in key.swaps(kind):
                (la, a), (lb, b) = sorted(((la, a), (lb, b)))
                ia, ib = pairs.setdefault((la, lb), ([], []))
                ia.extend(range(a * width, (a + 1) * width))
                ib.extend(range(b * width, (b + 1) * width))
            plan += [(kind, la, lb, torch.tensor(ia), torch.tensor(ib)) for (la, lb), (ia, ib) in pairs.items()]
    with torch.no_grad():
        for kind, la, lb, ia, ib in plan:
            pa, pb = f"transformer.h.{la}.", f"transformer.h.{lb}."
            if kind == "attn_heads":
                rows = [f"attn.attention.{n}_proj.weight" for n in "qkv"]
                cols = ["attn.attention.out_proj.weight"]
            else:
                rows, cols = ["mlp.c_fc.weight", "mlp.c_fc.bias"], ["mlp.c_proj.weight"]
            for name in rows:
                a, b = state[pa + name], state[pb + name]
                tmp = a[ia].clone()
                a[ia] = b[ib]
                b[ib] = tmp
            for name in cols:
                a, b = state[pa + name], state[pb + name]
                tmp = a[:, ia].clone()
                a[:, ia] = b[:, ib]
                b[:, ib] = tmp
    return plan


def print_in_memory(a) -> None:
    print(f"## Keying a model in memory: GPT-Neo shapes of the reference's benchmark, bf16, {100 * a.fraction:g}% "
          "key\n")
    print(f"- {machine(torch.device('cpu'))}; torch {torch.__version__}; {torch.get_num_threads()} threads; best of "
          f"{a.repeat} (alternating); each call moves the blocks and the next moves them back (a key undoes itself)\n")
    print("| shape | layers, heads, hidden, mlp | swaps (heads + MLP) | MB moved | apply_key_in_memory s | GB/s | "
          "reference apply_permutation s | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    shapes = dict(list(PUBLISHED_SHAPES.items())[:1]) if a.small else PUBLISHED_SHAPES  # --small: 180M alone
    for label, shape in shapes.items():
        layers, heads, hidden, mlp = shape
        cfg = {"model_type": "gpt_neo", "num_layers": layers, "num_heads": heads, "hidden_size": hidden,
               "intermediate_size": mlp}
        key = generate_key(cfg, SECRET, a.fraction)
        state = published_layers(shape)
        plan = published_apply(state, key, hidden // heads)  # builds the plan (the reference times it apart)
        published_apply(state, key, hidden // heads, plan)
        ours, theirs = float("inf"), float("inf")
        for _ in range(a.repeat):
            ours = min(ours, timed(lambda: apply_key_in_memory(state, key, cfg)))
            theirs = min(theirs, timed(lambda: published_apply(state, key, hidden // heads, plan)))
        moved = apply_key_in_memory(state, key, cfg).params_moved * 2  # bf16 bytes of the moved blocks
        apply_key_in_memory(state, key, cfg)
        # minimal traffic: each moved element read once and written once
        print(f"| {label} | {layers}, {heads}, {hidden}, {mlp} | {len(key.attn_heads)} + {len(key.mlp_cols)} | "
              f"{moved / 1e6:.0f} | {ours:.3f} | {2 * moved / ours / 1e9:.1f} | {theirs:.3f} | {theirs / ours:.1f}x |",
              flush=True)
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/merge_engine_bench_tiers", help="folder for the checkpoint and outputs")
    p.add_argument("--small", action="store_true", help=f"a small checkpoint for quick checks: {SMALL}")
    for name, default in SHAPE.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"checkpoint shape ({default})")
    p.add_argument("--fraction", type=float, default=0.05, help="share of the swappable parameters keyed (0.05)")
    p.add_argument("--batch", type=int, default=4, help="forward benchmark: sequences per batch (4)")
    p.add_argument("--length", type=int, default=128, help="forward benchmark: tokens per sequence (128)")
    p.add_argument("--repeat", type=int, default=10, help="forward benchmark: rounds, best kept (10)")
    p.add_argument("--skip-apply", action="store_true")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--skip-in-memory", action="store_true")
    a = p.parse_args()
    for name, default in (SMALL if a.small else SHAPE).items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    if not a.skip_apply:
        print_apply(a, work)
    if not a.skip_forward:
        print_forward(a)
    if not a.skip_in_memory:
        print_in_memory(a)


if __name__ == "__main__":
    main()
