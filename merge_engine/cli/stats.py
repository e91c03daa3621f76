"""`merge-engine stats MODEL DATA OUT [options]`: input Gram matrices of a model's linear layers."""
from __future__ import annotations

import argparse
import time

from merge_engine.cli.args import (
    add_data_arguments,
    add_model_arguments,
    add_output_arguments,
    parse_size,
    regex,
    setup_logging,
)
from merge_engine.distributed import torchrun_group
from merge_engine.dtypes import STATS_DTYPES, dtype_named
from merge_engine.extras import require


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine stats",
        description="Input Gram matrices X^T X of every linear layer of a model over a data set, for RegMean and "
                    "Bayesian Model Merging (name the output folder with `grams: OUT` beside the model in a "
                    "merge config).",
        epilog="Output: OUT holds safetensors shards with one Gram per group of linear modules that read the same "
               "input (a Llama layer's q/k/v projections share one), named <module>.gram, and grams.json, which "
               "maps every linear module to its Gram and records the model, the examples and tokens summed, the "
               "storage dtype and whether the Grams are packed.")
    add_data_arguments(p)
    add_model_arguments(p)
    p.add_argument("--gram-dtype", choices=STATS_DTYPES, default="float32",
                   help="storage of the Grams (accumulation is fp32); bfloat16 halves the files")
    p.add_argument("--packed", action="store_true", help="store each Gram's upper triangle only (about half)")
    p.add_argument("--max-gram-memory", type=parse_size, default=8 * 10**9,
                   help="fp32 Grams held at once (default 8B bytes); more Grams take more passes over the data")
    p.add_argument("--exclude", type=regex, default=None, help="regex of module names to leave out (e.g. 'lm_head')")
    add_output_arguments(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    transformers = require("transformers", "hf", "merge-engine stats")
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar
    from merge_engine.stats.gram import GramOptions, collect_grams
    options = GramOptions(batch_size=args.batch_size, max_length=args.max_length, max_examples=args.max_examples,
                          device=args.device, dtype=dtype_named(args.dtype), gram_dtype=args.gram_dtype,
                          packed=args.packed, max_gram_bytes=args.max_gram_memory, exclude=args.exclude,
                          overwrite=args.overwrite, quiet=args.quiet)
    start = time.perf_counter()
    with torchrun_group() as leader:  # under torchrun, the ranks share the data
        options.quiet = args.quiet or not leader
        manifest = collect_grams(args.model, args.data, args.out_dir, options)
    if not options.quiet:
        grams = len({m["gram"] for m in manifest["modules"].values()})
        print(f"{grams} Grams for {len(manifest['modules'])} linear modules over {manifest['examples']} examples, "
              f"{manifest['tokens']} tokens in {time.perf_counter() - start:.2f} s -> {args.out_dir}")
    return 0
