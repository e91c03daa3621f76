"""`merge-engine extract-lora --model TUNED --base-model BASE --out-path OUT [options]`: a fine-tune's difference
as a PEFT LoRA adapter (mergekit-extract-lora compatible), merge_engine/extract_lora.py."""
from __future__ import annotations

import argparse

from merge_engine.cli.args import setup_logging
from merge_engine.cli.merge import add_merge_options, merge_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine extract-lora",
        description="Extract a fine-tuned model's difference to its base as a PEFT LoRA adapter, as "
                    "mergekit-extract-lora does: each linear (and embedding, with --embed-lora) weight's difference "
                    "factored by SVD to at most --max-rank, embeddings and norms saved whole (modules_to_save).",
        epilog="Merge options that concern a merge's output (--out-shard-size, --random-seed, ...) are accepted "
               "for mergekit compatibility and change nothing here.")
    p.add_argument("--model", required=True, help="the fine-tuned model (folder, BASE+ADAPTER or Hub id)")
    p.add_argument("--base-model", required=True, help="its base model")
    p.add_argument("--out-path", required=True, help="the adapter's output folder")
    p.add_argument("--max-rank", type=int, default=128, help="most singular values kept per module (default 128)")
    p.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="split the singular values between A and B as square roots (default on; off: all in A)")
    p.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="factor embeddings too (lora_embedding_A/B) rather than saving them whole")
    p.add_argument("--save-module", dest="modules_to_save", action="append", default=[],
                   help="a module (its name or last name component) saved whole; repeatable")
    p.add_argument("-e", "--exclude-regex", dest="exclude_regexes", action="append", default=[],
                   help="leave out the modules whose name matches; repeatable")
    p.add_argument("-i", "--include-regex", dest="include_regexes", action="append", default=[],
                   help="factor only the modules whose name matches one of these; repeatable")
    p.add_argument("--sv-epsilon", type=float, default=0.0, help="drop singular values at or below this (default 0)")
    p.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out modules LoRA cannot hold (norms) rather than saving them whole")
    add_merge_options(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    options = merge_options(args)
    from merge_engine.extract_lora import ExtractOptions, extract_lora
    report = extract_lora(args.model, args.base_model, args.out_path, ExtractOptions(
        max_rank=args.max_rank, distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
        modules_to_save=args.modules_to_save, exclude_regexes=args.exclude_regexes,
        include_regexes=args.include_regexes, sv_epsilon=args.sv_epsilon,
        skip_undecomposable=args.skip_undecomposable, device=options.device, overwrite=options.overwrite,
        hub_cache=options.hub_cache))
    if not options.quiet:
        print(report.summary())
    return 0
