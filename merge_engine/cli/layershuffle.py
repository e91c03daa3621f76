"""`merge-engine layershuffle OUT -m M -m M [options]`: mergekit-layershuffle's random passthrough stacks
(merge_engine/config_scripts.py), run as a config is run."""
from __future__ import annotations

import argparse
import random

from merge_engine.cli.args import setup_logging
from merge_engine.cli.legacy import run_config
from merge_engine.cli.merge import add_merge_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine layershuffle",
        description="A passthrough stack whose layers come from models drawn at random, as mergekit-layershuffle "
                    "builds it: each of the first model's layer positions from a model drawn by --weight, or with "
                    "--full-random random layers of each model in a random order.",
        epilog="The draws follow --random-seed where it is given (mergekit draws unseeded); the config is kept in "
               "the output's model card either way.")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("-m", "--model", dest="models", action="append", default=[], required=True,
                   help="a model to draw layers from; repeatable")
    p.add_argument("-w", "--weight", type=float, action="append", default=[],
                   help="a model's weight, one per model in order (--full-random: the fraction of its layers it "
                        "gives); default equal")
    p.add_argument("--print-yaml", action=argparse.BooleanOptionalAction, default=False,
                   help="print the config before merging")
    p.add_argument("--write-yaml", metavar="PATH", help="write the config to this file")
    p.add_argument("--dry-run", action="store_true", help="write or print the config, merge nothing")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False, help="dtype: float16")
    p.add_argument("--full-random", action=argparse.BooleanOptionalAction, default=False,
                   help="draw layer indices too, not only their source model")
    add_merge_options(p)
    p.set_defaults(random_seed=None)  # (unseeded unless given, as mergekit's)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    from merge_engine.config_scripts import layershuffle_config
    from merge_engine.io.hub_cache import local_reference
    from merge_engine.io.lora import open_model
    layers = {}
    for model in dict.fromkeys(args.models):
        ckpt = open_model(local_reference(model, args.transformers_cache))
        layers[model] = ckpt.num_layers
        ckpt.close()
    rng = random.Random(args.random_seed)
    config = layershuffle_config(args.models, layers, args.weight, args.full_random, args.fp16, rng)
    if args.random_seed is None:
        args.random_seed = 0
    if args.dry_run:
        args.out_dir = None
    return run_config(config, args, args.print_yaml, args.write_yaml)
