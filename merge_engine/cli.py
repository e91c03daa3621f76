"""Command line: `merge-engine CONFIG.yml OUTPUT_DIR [options]` (mergekit-yaml compatible)."""
from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings

import torch

from merge_engine.errors import MergeEngineError

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
               "della, della_linear, slerp, nuslerp, model_stock, passthrough. See README.md.")
    p.add_argument("config", help="merge config (mergekit YAML schema)")
    p.add_argument("out_dir", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--device", default="auto", help="where the math runs: cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--cuda", action="store_const", const="cuda", dest="device", help="same as --device cuda")
    p.add_argument("--out-shard-size", type=parse_size, default=parse_size("5B"),
                   help="largest output shard in bytes; K/M/B suffixes allowed (default 5B = 5e9 bytes)")
    p.add_argument("--random-seed", type=int, default=0,
                   help="seed of the counter-based generator used by DARE and DELLA (default 0)")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy tokenizer files from the base model or tokenizer_source (default on)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.quiet:
        logging.getLogger("merge_engine").setLevel(logging.WARNING)
    warnings.simplefilter("default")
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


if __name__ == "__main__":
    sys.exit(main())
