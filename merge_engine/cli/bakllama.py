"""`merge-engine bakllama CONFIG OUT [--fp16]`: bakllama's layer-slice files (merge_engine/config_scripts.py), run as
a config is run."""
from __future__ import annotations

import argparse

from merge_engine.cli.args import setup_logging
from merge_engine.cli.legacy import run_config
from merge_engine.cli.merge import add_merge_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine bakllama",
        description="Stack layer slices of models as a bakllama file lists them (layer_slices: model, start, end, "
                    "scale applied to down_proj), a passthrough merge.")
    p.add_argument("config", help="the bakllama YAML file")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False, help="dtype: float16")
    p.add_argument("--print-yaml", action=argparse.BooleanOptionalAction, default=False,
                   help="print the config before merging")
    add_merge_options(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    from merge_engine.config_scripts import bakllama_config
    from merge_engine.errors import ConfigError
    try:
        with open(args.config, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"cannot read it ({e.strerror})"], args.config) from e
    return run_config(bakllama_config(text, args.fp16, args.config), args, args.print_yaml)
