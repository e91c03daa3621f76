"""Benchmark: `merge-engine moe` against mergekit-moe 0.1.5, building a Mixtral from a Llama-shaped bf16 base and
three experts (bench_merge.py's models, 162M parameters each with --small), warm page cache, CPU.

For each gate mode: wall time, CPU time and peak RSS of `python -m merge_engine moe CONFIG OUT -q` and of
`mergekit-moe CONFIG OUT` in processes of their own (start-up included), the same config and seed, the inputs read
once beforehand; beside them the I/O floor of the build: a plain read of as many input bytes as the build reads
(the base's non-MLP tensors and each expert's MLPs: bytes_read of the engine's report) and a direct write and fsync
of the output's size. The outputs are compared tensor by tensor (the same seed: identical).

    python bench/bench_moe.py --small                      # 162M models: random, cheap_embed, hidden gates
    python bench/bench_moe.py --small --gate-modes random --skip-mergekit
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import yaml

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

MERGEKIT_MOE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mergekit", "bin",
                            "mergekit-moe")
PROMPTS = (["w1 w2 w3", "w4 w5 w6 w7"], ["w100 w101", "w102"], ["w2000 w2001 w2002"])


def add_tokenizer(folder: str, vocab: int) -> None:
    """A word-level tokenizer of the model's vocabulary (w0, w1, ...; the first three ids special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)


def write_config(paths: list[str], gate_mode: str, path: str) -> str:
    config = {"base_model": paths[0], "gate_mode": gate_mode, "dtype": "bfloat16",
              "experts": [{"source_model": p, "positive_prompts": PROMPTS[i]} for i, p in enumerate(paths[1:])]}
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def identical(ours: str, theirs: str) -> str:
    a, b = open_tensors(ours), open_tensors(theirs)
    if set(a) != set(b):
        return f"different tensor names ({len(set(a) ^ set(b))})"
    same = sum(a[n].get_tensor(n).equal(b[n].get_tensor(n)) for n in a)
    return "identical" if same == len(a) else f"{len(a) - same} of {len(a)} tensors differ"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/merge_engine_bench", help="folder for models and outputs")
    p.add_argument("--small", action="store_true", help=f"the small model: {SMALL}")
    p.add_argument("--gate-modes", default="random,cheap_embed,hidden")
    p.add_argument("--mergekit", default=MERGEKIT_MOE, help="mergekit-moe executable")
    p.add_argument("--skip-mergekit", action="store_true")
    a = p.parse_args()
    vars(a).update(SMALL if a.small else SHAPE)
    root = os.path.join(os.path.abspath(a.work), f"llama-L{a.layers}-H{a.hidden}-I{a.intermediate}-V{a.vocab}")
    paths = generate_models_apart(a, root)
    add_tokenizer(paths[0], a.vocab)
    inputs = [f for path in paths for f in safetensors_files(path)]
    rows = []
    for mode in a.gate_modes.split(","):
        config = write_config(paths, mode, os.path.join(root, f"moe-{mode}.yml"))
        ours, theirs = os.path.join(root, f"moe-{mode}-ours"), os.path.join(root, f"moe-{mode}-theirs")
        read_files(inputs)
        engine = run_merge([sys.executable, "-m", "merge_engine", "moe", config, ours, "-q", "--random-seed", "1"],
                           ours, os.path.join(root, f"moe-{mode}-ours.log"), warm=True)
        out_bytes = folder_bytes(ours)
        read_bytes = _bytes_read(paths, ours)
        floor = _warm_floor(inputs, read_bytes, out_bytes, os.path.join(root, "scratch.bin"))
        theirs_run = None
        if not a.skip_mergekit:
            read_files(inputs)
            theirs_run = run_merge([a.mergekit, config, theirs, "--random-seed", "1"], theirs,
                                   os.path.join(root, f"moe-{mode}-theirs.log"), warm=True)
        rows.append([mode, read_bytes, out_bytes, floor, engine, theirs_run, (ours, theirs)])
    for row in rows:  # after every timed run: a child inherits its parent's peak RSS, and comparing loads tensors
        row[-1] = identical(*row[-1]) if row[5] else "-"
    _print_table(rows, a)


def _bytes_read(paths: list[str], out: str) -> int:
    """What the build reads: the output's bytes less its routers' (every other output tensor is one input tensor's
    bytes, in the inputs' dtype here)."""
    routers = sum(f.get_slice(n).get_shape()[0] * f.get_slice(n).get_shape()[1] * 2
                  for n, f in open_tensors(out).items() if n.endswith("mlp.gate.weight"))
    return folder_bytes(out) - routers


def _warm_floor(inputs: list[str], read_bytes: int, out_bytes: int, scratch: str) -> float:
    """A plain read of the inputs' first read_bytes bytes (in the page cache), a direct write of out_bytes, fsync."""
    chosen, left = [], read_bytes
    for f in inputs:
        if left <= 0:
            break
        chosen.append(f)
        left -= os.path.getsize(f)
    start = time.perf_counter()
    read_files(chosen)
    read = time.perf_counter() - start
    return read + io_floor([], out_bytes, scratch, direct=False, direct_write=True)


def _print_table(rows, a) -> None:
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; models: Llama "
          f"L{a.layers} H{a.hidden} I{a.intermediate} V{a.vocab} bf16, base + 3 experts -> Mixtral (3 experts)\n")
    print("| gate mode | read GB | written GB | warm floor s | merge-engine s | x floor | CPU s | peak RSS GB | "
          "mergekit-moe s | CPU s | peak RSS GB | x merge-engine | outputs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for mode, read, written, floor, (wall, rss, cpu, _), theirs, same in rows:
        mk = (f"{theirs[0]:.2f} | {theirs[2]:.1f} | {theirs[1] / 1e9:.2f} | {theirs[0] / wall:.1f}" if theirs
              else "- | - | - | -")
        print(f"| {mode} | {read / 1e9:.2f} | {written / 1e9:.2f} | {floor:.2f} | {wall:.2f} | {wall / floor:.2f} | "
              f"{cpu:.1f} | {rss / 1e9:.2f} | {mk} | {same} |")


if __name__ == "__main__":
    main()
