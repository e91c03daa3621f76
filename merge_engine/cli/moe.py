"""`merge-engine moe CONFIG.yml OUTPUT_DIR [options]`: a mixture-of-experts model from dense ones (mergekit-moe
compatible), merge_engine/moe.py."""
from __future__ import annotations

import argparse

from merge_engine.cli.args import setup_logging
from merge_engine.cli.merge import add_merge_options, merge_options
from merge_engine.errors import MergeEngineError

QUANTIZED_LOADING = ("--load-in-4bit", "--load-in-8bit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine moe",
        description="Build a mixture-of-experts model (Mixtral, DeepSeek MoE, Qwen MoE or Qwen3 MoE) from a base "
                    "model and dense expert models, as a mergekit-moe YAML config describes it.",
        epilog="Routers come from the experts' prompts (gate_mode hidden, hidden_avg, cheap_embed) or from "
               "--random-seed (random, uniform_random); noise_scale draws from the same seeded generator.")
    p.add_argument("config", help="the MoE config (mergekit-moe YAML schema)")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                   help="allow experts that are all the same model (mergekit-moe's flag)")
    for flag in QUANTIZED_LOADING:
        p.add_argument(flag, action="store_true", help="mergekit-moe's quantized loading of the base for hidden "
                                                        "states: refused (the base runs in bf16)")
    add_merge_options(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    if args.load_in_4bit or args.load_in_8bit:
        raise MergeEngineError("--load-in-4bit/--load-in-8bit are not supported: the base model computes the gate "
                               "vectors in bf16 (on --device cuda where it fits)")
    options = merge_options(args)
    from merge_engine.io.writer import check_output_apart
    from merge_engine.moe import build_moe, load_moe_config
    config = load_moe_config(args.config, strict=args.strict, allow_all_same=args.allow_all_same)
    check_output_apart(args.out_dir, [args.config])  # --overwrite would delete a config kept in OUT
    report = build_moe(config, args.out_dir, options, allow_all_same=args.allow_all_same)
    if not options.quiet:
        print(report.summary())
    return 0
