"""`merge-engine legacy OUT --merge M [--merge M ...] [options]`: mergekit-legacy's command-line merge
(merge_engine/config_scripts.py), run as a config is run."""
from __future__ import annotations

import argparse

from merge_engine.cli.args import setup_logging
from merge_engine.cli.merge import add_merge_options, merge_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine legacy",
        description="Merge models given on the command line, as mergekit-legacy does: the config it writes "
                    "(--print-yaml shows it) run as merge-engine runs any config.")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--merge", dest="models", action="append", default=[], required=True,
                   help="a model to merge; repeatable")
    p.add_argument("--density", type=float, action="append", default=[],
                   help="fraction of weights kept: one for every model, or one per model in order; repeatable")
    p.add_argument("--weight", type=float, action="append", default=[],
                   help="a model's weight: one for every model, or one per model in order (slerp: its t); "
                        "repeatable")
    p.add_argument("--method", default="ties", help="merge method (default ties)")
    p.add_argument("--base-model", help="the base model (added after the others where it is not among them)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="divide by the sum of weights (default on)")
    p.add_argument("--int8-mask", action=argparse.BooleanOptionalAction, default=False,
                   help="the int8_mask parameter (accepted by every method; masks are never stored here)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="dtype: bfloat16")
    p.add_argument("--naive-count", action=argparse.BooleanOptionalAction, default=False,
                   help="consensus_method: count (sign election by count rather than by summed weight)")
    p.add_argument("--print-yaml", action=argparse.BooleanOptionalAction, default=False,
                   help="print the config before merging")
    add_merge_options(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    from merge_engine.config_scripts import legacy_config
    config = legacy_config(args.models, args.method, args.base_model, args.density, args.weight, args.normalize,
                           args.int8_mask, args.bf16, args.naive_count)
    return run_config(config, args, args.print_yaml)


def run_config(config: dict, args: argparse.Namespace, print_yaml: bool, write_yaml: str | None = None) -> int:
    """Print or write the generated config where asked, then merge it into args.out_dir."""
    import yaml

    from merge_engine.engine import merge
    text = yaml.safe_dump(config, sort_keys=False)
    if print_yaml:
        print(text)
    if write_yaml:
        with open(write_yaml, "w", encoding="utf-8") as f:
            f.write(text)
    if args.out_dir is None:
        return 0
    report = merge(config, args.out_dir, merge_options(args))
    if not args.quiet:
        print(report.summary())
    return 0
