"""Benchmark: `merge-engine tokensurgeon` against mergekit-tokensurgeon 0.1.5, warm page cache, CPU.

The model and donor are two of bench_merge.py's models (with --small 162M-parameter Llamas, vocabulary 32000) given
word-level tokenizers: the donor's has --new tokens the model lacks (its other tokens the model's, ids shuffled).
For each approximation method: wall time, CPU time and peak RSS of `python -m merge_engine tokensurgeon MODEL DONOR
OUT -q` and `mergekit-tokensurgeon MODEL DONOR OUT`, processes of their own (start-up included), the inputs read
once beforehand; beside them the warm I/O floor (a plain read of the model's files and the donor's, a direct write
and fsync of the output's size). The outputs are compared: copied rows and other tensors must be identical, and the
largest difference of an approximated row is printed relative to the row's largest element.

    python bench/bench_tokensurgeon.py --small
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import (  # noqa: E402
    SHAPE,
    SMALL,
    folder_bytes,
    generate_models_apart,
    io_floor,
    read_files,
    run_merge,
    safetensors_files,
)

MERGEKIT_TOKENSURGEON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mergekit",
                                     "bin", "mergekit-tokensurgeon")
METHODS = {"omp": ["-k", "64"], "common_interpolation": ["-a", "common_interpolation", "-k", "8"],
           "subword": ["-a", "subword"]}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def give_tokenizers(model: str, donor: str, vocab: int, new: int) -> None:
    """Word-level tokenizers: the model's tokens t0..t{vocab-1}; the donor's the same less `new` of them plus `new`
    tokens n0..., in a shuffled order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    model_tokens = ["<unk>"] + [f"t{i}" for i in range(vocab - 1)]
    donor_tokens = model_tokens[:vocab - new] + [f"n{i}" for i in range(new)]
    random.Random(0).shuffle(donor_tokens)
    for path, tokens in ((model, model_tokens), (donor, donor_tokens)):
        backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)


def linked(src: str, dst: str) -> str:
    """dst: a folder of hard links to src's files (bench_merge.py's models stay without tokenizers)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not os.path.exists(os.path.join(dst, name)):
            os.link(os.path.join(src, name), os.path.join(dst, name))
    return dst


def compare(ours: str, theirs: str) -> tuple[str, float]:
    """("identical" or what differs outside the approximated rows, the largest relative difference of a row)."""
    files = [{n: f for f in safetensors_files(d) for n in safe_open(f, "pt").keys()} for d in (ours, theirs)]
    if set(files[0]) != set(files[1]):
        return "different tensor names", float("nan")
    worst, other = 0.0, 0
    for name in files[0]:
        x, y = (safe_open(f[name], "pt").get_tensor(name).float() for f in files)
        if name in VOCAB_TENSORS:
            worst = max(worst, float(((x - y).abs().amax(dim=1) / y.abs().amax(dim=1).clamp(min=1e-30)).max()))
        elif not torch.equal(x, y):
            other += 1
    return ("identical" if not other else f"{other} other tensors differ"), worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/merge_engine_bench", help="folder for models and outputs")
    p.add_argument("--small", action="store_true", help=f"the small model: {SMALL}")
    p.add_argument("--new", type=int, default=2000, help="donor tokens the model lacks")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--mergekit", default=MERGEKIT_TOKENSURGEON, help="mergekit-tokensurgeon executable")
    a = p.parse_args()
    vars(a).update(SMALL if a.small else SHAPE)
    root = os.path.join(os.path.abspath(a.work), f"llama-L{a.layers}-H{a.hidden}-I{a.intermediate}-V{a.vocab}")
    model, donor = (linked(src, os.path.join(root, f"surgery-{role}"))
                    for src, role in zip(generate_models_apart(a, root), ("model", "donor")))
    give_tokenizers(model, donor, a.vocab, a.new)
    inputs = safetensors_files(model) + safetensors_files(donor)
    rows = []
    for method in a.methods.split(","):
        ours, theirs = os.path.join(root, f"surgery-{method}-ours"), os.path.join(root, f"surgery-{method}-theirs")
        argv = [model, donor]
        read_files(inputs)
        engine = run_merge([sys.executable, "-m", "merge_engine", "tokensurgeon", *argv, ours, *METHODS[method], "-q"],
                           ours, os.path.join(root, f"surgery-{method}-ours.log"), warm=True)
        read_files(inputs)
        try:
            mergekit = run_merge([a.mergekit, *argv, theirs, *METHODS[method]], theirs,
                                 os.path.join(root, f"surgery-{method}-theirs.log"), warm=True)
        except SystemExit as e:  # (mergekit fails on some methods: common_interpolation on bf16 models)
            print(e, file=sys.stderr)
            mergekit = None
        read_files(inputs)
        floor = io_floor(inputs, folder_bytes(ours), os.path.join(root, "scratch.bin"), direct=False)
        rows.append([method, floor, engine, mergekit, (ours, theirs)])
    for row in rows:  # after every timed run: a child inherits its parent's peak RSS
        row[-1] = compare(*row[-1]) if row[-2] is not None else ("mergekit fails", float("nan"))
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    dtype = config.get("dtype") or config.get("torch_dtype")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model and donor: Llama "
          f"L{a.layers} H{a.hidden} I{a.intermediate} V{a.vocab} {dtype}, {a.new} donor tokens new to the model\n")
    print("| method | warm floor s | merge-engine s | x floor | CPU s | peak RSS GB | mergekit-tokensurgeon s | CPU s | "
          "peak RSS GB | x merge-engine | other tensors | vocabulary rows: largest difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for method, floor, (wall, rss, cpu, _), theirs, (same, worst) in rows:
        mk = (f"{theirs[0]:.2f} | {theirs[2]:.1f} | {theirs[1] / 1e9:.2f} | {theirs[0] / wall:.1f}" if theirs
              else "fails | | |")
        print(f"| {method} | {floor:.2f} | {wall:.2f} | {wall / floor:.2f} | {cpu:.1f} | {rss / 1e9:.2f} | {mk} | "
              f"{same} | {worst:.1e} |")


if __name__ == "__main__":
    main()
