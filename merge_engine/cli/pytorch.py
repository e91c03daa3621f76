"""`merge-engine pytorch CONFIG.yml OUTPUT_DIR [options]`: merge raw weight files (mergekit-pytorch compatible),
merge_engine/flat.py."""
from __future__ import annotations

import argparse

from merge_engine.cli.args import setup_logging
from merge_engine.cli.merge import add_merge_options, merge_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine pytorch",
        description="Merge weight files (.safetensors, or torch.save files) tensor by tensor, as a mergekit-pytorch "
                    "YAML config describes: merge_method, models (each `model: FILE` with its parameters), "
                    "base_model, parameters, dtype, out_dtype.",
        epilog="Parameters are resolved for each tensor name at layer position 0 (a gradient gives its first value). "
               "A tensor some files lack is refused unless -i or -u says otherwise.")
    p.add_argument("config", help="the merge config (mergekit-pytorch YAML schema)")
    p.add_argument("out_dir", help="output folder (model.safetensors, or shards and their index)")
    missing = p.add_mutually_exclusive_group()
    missing.add_argument("-i", "--tensor-intersection", action="store_true",
                         help="merge only the tensors every file holds (skip the others)")
    missing.add_argument("-u", "--tensor-union", action="store_true",
                         help="merge every tensor any file holds, from the files that hold it")
    add_merge_options(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    options = merge_options(args)
    from merge_engine.flat import flat_merge, load_flat_config
    from merge_engine.io.writer import check_output_apart
    config = load_flat_config(args.config, strict=args.strict)
    check_output_apart(args.out_dir, [args.config])  # --overwrite would delete a config kept in OUT
    missing = "intersection" if args.tensor_intersection else "union" if args.tensor_union else "refuse"
    report = flat_merge(config, args.out_dir, options, missing)
    if not options.quiet:
        print(report.summary())
    return 0
