"""Command line.

    merge-engine CONFIG.yml OUTPUT_DIR [options]         merge (mergekit-yaml compatible)
    merge-engine fisher MODEL DATA OUT [options]         diagonal Fisher of a model over a data set
    merge-engine stats MODEL DATA OUT [options]          input Gram matrices of its linear layers (RegMean, BMM)
    merge-engine key generate|apply|remove|recover|report|compare ...   tier keys (merge_engine.tiers.cli)

A first argument naming a subcommand selects it; anything else is a merge (a config file named like a
subcommand can be passed as ./NAME).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
import warnings

import torch

from merge_engine.errors import MergeEngineError
from merge_engine.runtime import tune_process_for_merging

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBgGtT]?)\s*$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
# mergekit flags that only tune its own executor; merge_engine always streams, so they change nothing.
_COMPAT_FLAGS = ("--low-cpu-memory", "--read-to-gpu", "--async-write", "--lazy-unpickle", "--clone-tensors",
                 "--safe-serialization", "--trust-remote-code", "--write-model-card", "--multi-gpu", "--gpu-rich")


def parse_size(text: str) -> int:
    """'5B', '500M', '2k' or plain bytes -> bytes (K/M/B(G)/T are powers of 1000, as in mergekit)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 5B, 500M, 1000000)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine",
        description="Merge model checkpoints described by a mergekit YAML config, streaming tensor by tensor.",
        epilog="Methods: linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, "
               "della, della_linear, slerp, nuslerp, multislerp, karcher, model_stock, nearswap, sce, ram, "
               "ramplus_tl, arcee_fusion, passthrough, tsv, iso_c, regmean, bmm, fisher, "
               "fisher_task_arithmetic, fisher_ties. See README.md. "
               "Other commands: merge-engine fisher --help, merge-engine stats --help, merge-engine key --help.")
    p.add_argument("config", help="merge config (mergekit YAML schema)")
    p.add_argument("out_dir", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--device", default="auto", help="where the math runs: cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--cuda", action="store_const", const="cuda", dest="device", help="same as --device cuda")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"),
                   help="largest output shard in bytes; K/M/B suffixes allowed (default 5B = 5e9 bytes)")
    p.add_argument("--random-seed", type=int, default=0,
                   help="seed of the counter-based generator used by DARE and DELLA (default 0)")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base model's tokenizer files (default on); a tokenizer built from "
                        "tokenizer_source or tokenizer: is written either way")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--allow-crimes", action="store_true",
                   help="allow merging models whose config.json architectures differ")
    p.add_argument("-j", "--num-threads", type=int, default=None, help="CPU threads for the math")
    p.add_argument("--prefetch", type=int, default=2, help="tensor groups read ahead of compute (default 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for flag in _COMPAT_FLAGS:
        p.add_argument(flag, action="store_true", help="accepted for mergekit compatibility; no effect")
    p.add_argument("--write-threads", type=int, help="accepted for mergekit compatibility; no effect")
    for flag in ("--lora-merge-cache", "--transformers-cache"):  # adapters are applied while reading: no copies
        p.add_argument(flag, metavar="PATH", help="accepted for mergekit compatibility; no effect")
    return p


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if quiet:
        logging.getLogger("merge_engine").setLevel(logging.WARNING)
    warnings.simplefilter("default")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    tune_process_for_merging()  # this process exists to merge: see merge_engine/runtime.py
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return merge_main(argv)


def merge_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from merge_engine.config import load_config
    from merge_engine.engine import MergeOptions, merge
    options = MergeOptions(device=args.device or "auto", out_shard_size=args.out_shard_size,
                           random_seed=args.random_seed, copy_tokenizer=args.copy_tokenizer,
                           overwrite=args.overwrite, prefetch=args.prefetch, quiet=args.quiet,
                           allow_crimes=args.allow_crimes)
    try:
        report = merge(load_config(args.config), args.out_dir, options)
    except MergeEngineError as e:
        print(f"merge-engine: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(report.summary())
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL DATA OUT and how DATA is batched: the statistics commands (fisher, stats) share them."""
    p.add_argument("model", help="local Hugging Face model folder (safetensors weights, config.json, tokenizer)")
    p.add_argument("data", help="plain text (one example per non-blank line) or .jsonl ({\"text\": ...} per line)")
    p.add_argument("out_dir", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch (default 8)")
    p.add_argument("--max-length", type=positive_int, default=512, help="tokens per example, truncated (default 512)")
    p.add_argument("--max-examples", type=positive_int, default=None, help="use only the first N examples")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="where the model runs: cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                   help="dtype the model is loaded and run in (default: as stored in the checkpoint)")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def build_fisher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine fisher",
        description="Diagonal Fisher information of a causal LM over a data set, saved as safetensors plus "
                    "fisher.json, for Fisher merging. See merge_engine/stats/fisher.py for the definitions.")
    add_data_arguments(p)
    p.add_argument("--variant", choices=("empirical", "sampled"), default="empirical",
                   help="targets: the observed next tokens (empirical, default) or draws from the model (sampled)")
    p.add_argument("--per-example", action="store_true",
                   help="one backward per example (exact); default: one per batch, F += |B| g_B^2")
    p.add_argument("--seed", type=int, default=0, help="seed of the label draws of --variant sampled (default 0)")
    add_model_arguments(p)
    p.add_argument("--fisher-dtype", choices=tuple(_DTYPES), default="float32",
                   help="storage of the Fisher (math is fp32); bfloat16 halves its memory, less precisely")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass to save memory")
    add_output_arguments(p)
    return p


def fisher_main(argv: list[str]) -> int:
    args = build_fisher_parser().parse_args(argv)
    setup_logging(args.quiet)
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # its "Loading weights" bar
    from merge_engine.stats.fisher import FisherOptions, collect_fisher
    options = FisherOptions(variant=args.variant, per_example=args.per_example, batch_size=args.batch_size,
                            max_length=args.max_length, max_examples=args.max_examples, seed=args.seed,
                            device=args.device, dtype=_DTYPES.get(args.dtype),
                            fisher_dtype=_DTYPES[args.fisher_dtype],
                            gradient_checkpointing=args.gradient_checkpointing, overwrite=args.overwrite,
                            quiet=args.quiet)
    start = time.perf_counter()
    try:
        manifest = collect_fisher(args.model, args.data, args.out_dir, options)
    except MergeEngineError as e:
        print(f"merge-engine: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{manifest['variant']} Fisher ({manifest['granularity']}) of {manifest['tensors']} tensors over "
              f"{manifest['examples']} examples, {manifest['tokens']} tokens in {time.perf_counter() - start:.2f} s "
              f"-> {args.out_dir}")
    return 0


def build_stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine stats",
        description="Input Gram matrices X^T X of every linear layer of a model over a data set, saved as "
                    "safetensors plus grams.json, for RegMean and Bayesian Model Merging. See "
                    "merge_engine/stats/gram.py.")
    add_data_arguments(p)
    add_model_arguments(p)
    p.add_argument("--gram-dtype", choices=tuple(_DTYPES), default="float32",
                   help="storage of the Grams (accumulation is fp32); bfloat16 halves the files")
    p.add_argument("--packed", action="store_true", help="store each Gram's upper triangle only (about half)")
    p.add_argument("--max-gram-memory", type=parse_size, default=8 * 10**9,
                   help="fp32 Grams held at once (default 8B bytes); more Grams take more passes over the data")
    p.add_argument("--exclude", default=None, help="regex of module names to leave out (e.g. 'lm_head')")
    add_output_arguments(p)
    return p


def stats_main(argv: list[str]) -> int:
    args = build_stats_parser().parse_args(argv)
    setup_logging(args.quiet)
    from merge_engine.stats.gram import GramOptions, collect_grams
    options = GramOptions(batch_size=args.batch_size, max_length=args.max_length, max_examples=args.max_examples,
                          device=args.device, dtype=_DTYPES.get(args.dtype), gram_dtype=args.gram_dtype,
                          packed=args.packed, max_gram_bytes=args.max_gram_memory, exclude=args.exclude,
                          overwrite=args.overwrite, quiet=args.quiet)
    start = time.perf_counter()
    try:
        manifest = collect_grams(args.model, args.data, args.out_dir, options)
    except MergeEngineError as e:
        print(f"merge-engine: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        grams = len({m["gram"] for m in manifest["modules"].values()})
        print(f"{grams} Grams for {len(manifest['modules'])} linear modules over {manifest['examples']} examples, "
              f"{manifest['tokens']} tokens in {time.perf_counter() - start:.2f} s -> {args.out_dir}")
    return 0


# first argument -> handler of the remaining arguments; anything else is a merge
def key_main(argv: list[str]) -> int:
    from merge_engine.tiers.cli import main as tiers_main
    return tiers_main(argv)


SUBCOMMANDS = {"fisher": fisher_main, "key": key_main, "stats": stats_main}


if __name__ == "__main__":
    sys.exit(main())
