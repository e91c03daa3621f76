"""`merge-engine multi CONFIG.yml --intermediate-dir DIR [--out-path OUT]`: a multi-stage merge (mergekit-multi
compatible), merge_engine/multi.py."""
from __future__ import annotations

import argparse

from merge_engine.cli.args import setup_logging
from merge_engine.cli.merge import add_merge_options, merge_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine multi",
        description="Run the merges of a mergekit-multi YAML file (several configs, `---` between them, each named by "
                    "a `name:` key but the final one), each after the merges it reads by name.",
        epilog="A named merge is written to INTERMEDIATE_DIR/NAME, the unnamed one to --out-path; a model given as a "
               "merge's name reads that merge's output. Every config is checked before the first merge.")
    p.add_argument("config", help="the merges (mergekit YAML schema, several documents)")
    p.add_argument("-I", "--intermediate-dir", required=True, help="folder of the named merges' outputs")
    p.add_argument("--out-path", help="output folder of the final (unnamed) merge")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="skip a merge whose output folder already holds config.json and weights (default on)")
    add_merge_options(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    options = merge_options(args)
    from merge_engine.multi import plan_stages, run_stages
    stages = plan_stages(args.config, args.intermediate_dir, args.out_path, strict=args.strict,
                         hub_cache=args.transformers_cache)
    for stage, report in zip(stages, run_stages(stages, options, lazy=args.lazy)):
        if not options.quiet:
            print(f"{stage.name or 'final merge'}: " + (report.summary() if report else
                                                          f"{stage.out_dir} is complete already, not merged again"))
    return 0
