"""`merge-engine fisher MODEL DATA OUT [options]`: the diagonal Fisher of a model over a data set."""
from __future__ import annotations

import argparse
import time

from merge_engine.cli.args import add_data_arguments, add_model_arguments, add_output_arguments, setup_logging
from merge_engine.distributed import torchrun_group
from merge_engine.dtypes import STATS_DTYPES, dtype_named
from merge_engine.extras import require
from merge_engine.io.fishers import VARIANTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine fisher",
        description="Diagonal Fisher information of a causal LM over a data set, saved as safetensors plus "
                    "fisher.json, for Fisher merging. See merge_engine/stats/fisher.py for the definitions.")
    add_data_arguments(p)
    p.add_argument("--variant", choices=VARIANTS, default="empirical",
                   help="targets: the observed next tokens (empirical, default) or draws from the model (sampled)")
    p.add_argument("--per-example", action="store_true",
                   help="one backward per example (exact); default: one per batch, F += |B|^2 g_B^2")
    p.add_argument("--seed", type=int, default=0, help="seed of the label draws of --variant sampled (default 0)")
    add_model_arguments(p)
    p.add_argument("--fisher-dtype", choices=STATS_DTYPES, default="float32",
                   help="storage of the Fisher (math is fp32); bfloat16 halves its memory, less precisely")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass to save memory")
    add_output_arguments(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    transformers = require("transformers", "hf", "merge-engine fisher")
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar
    from merge_engine.stats.fisher import FisherOptions, collect_fisher
    options = FisherOptions(variant=args.variant, per_example=args.per_example, batch_size=args.batch_size,
                            max_length=args.max_length, max_examples=args.max_examples, seed=args.seed,
                            device=args.device, dtype=dtype_named(args.dtype),
                            fisher_dtype=dtype_named(args.fisher_dtype),
                            gradient_checkpointing=args.gradient_checkpointing, overwrite=args.overwrite,
                            quiet=args.quiet)
    start = time.perf_counter()
    with torchrun_group() as leader:  # under torchrun, the ranks share the data
        options.quiet = args.quiet or not leader
        manifest = collect_fisher(args.model, args.data, args.out_dir, options)
    if not options.quiet:
        print(f"{manifest['variant']} Fisher ({manifest['granularity']}) of {manifest['tensors']} tensors over "
              f"{manifest['examples']} examples, {manifest['tokens']} tokens in {time.perf_counter() - start:.2f} s "
              f"-> {args.out_dir}")
    return 0
