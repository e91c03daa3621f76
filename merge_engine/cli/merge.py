"""`merge-engine CONFIG.yml OUTPUT_DIR [options]`: a merge (mergekit-yaml compatible)."""
from __future__ import annotations

import argparse
import logging
import time

import torch

from merge_engine import __version__
from merge_engine.cli.args import (
    MAX_THREADS,
    add_quiet_argument,
    parse_size,
    positive_int,
    setup_logging,
    shard_size,
    thread_count,
)
from merge_engine.cli.timing import STARTUP
from merge_engine.dtypes import DTYPES
from merge_engine.methods import REGISTRY

# mergekit-yaml's flags that only tune its own executor or output (each with its --no- form, as click
# gives them); merge_engine always streams, so they change nothing.
_COMPAT_FLAGS = ("--low-cpu-memory", "--read-to-gpu", "--async-write", "--lazy-unpickle", "--clone-tensors",
                 "--safe-serialization", "--trust-remote-code", "--multi-gpu")


log = logging.getLogger("merge_engine")

# mergekit-yaml's flags whose effect merge_engine does not have, each (dest, value) with what happens instead
FLAG_NOTES = {
    ("safe_serialization", False): "--no-safe-serialization: the output is written as safetensors all the same "
                                   "(merge_engine writes no pickled checkpoints)",  # mergekit: pytorch_model*.bin
    ("trust_remote_code", True): "--trust-remote-code: merge_engine runs no code a model folder ships (it reads "
                                 "tensors, config.json and tokenizer files); a tokenizer that needs its code "
                                 "cannot be loaded",
    **{(dest, True): f"--{dest.replace('_', '-')}: one process merges on one device; run it under torchrun for "
                     "several GPUs" for dest in ("multi_gpu", "gpu_rich")},
}

SEED_RANGE = 2**63  # the generator's key takes a 64-bit signed seed


def seed(text: str) -> int:
    value = int(text)
    if not -SEED_RANGE <= value < SEED_RANGE:
        raise argparse.ArgumentTypeError(f"{text} is outside the 64-bit seed range [-2**63, 2**63)")
    return value


def lora_merge_dtype(text: str) -> torch.dtype:
    """mergekit's dtype names, with or without "torch."."""
    name = text.removeprefix("torch.")
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine",
        description="Merge model checkpoints described by a mergekit YAML config, streaming tensor by tensor.",
        epilog=f"Methods: {', '.join(REGISTRY)}. See README.md. "
               "Other commands: merge-engine multi --help, merge-engine moe --help, merge-engine pytorch --help, "
               "merge-engine extract-lora --help, merge-engine tokensurgeon --help, merge-engine legacy --help, "
               "merge-engine layershuffle --help, merge-engine bakllama --help, merge-engine fisher --help, merge-engine stats --help, "
               "merge-engine key --help, merge-engine patch --help, merge-engine search --help.")
    p.add_argument("config", help="merge config (mergekit YAML schema)")
    p.add_argument("out_dir", help="output folder (must not exist or be empty, unless --overwrite)")
    add_merge_options(p)
    return p


def add_merge_options(p: argparse.ArgumentParser) -> None:
    """A merge's options (mergekit-yaml's, and merge_engine's own): every merge command's."""
    p.add_argument("--device", default="auto", help="where the math runs: cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--cuda", action="store_const", const="cuda", dest="device", help="same as --device cuda")
    p.add_argument("--no-cuda", action="store_const", const="cpu", dest="device", help="same as --device cpu")
    p.add_argument("--out-shard-size", type=shard_size, default=parse_size("5B"),
                   help="most tensor bytes per output shard; K/M/B suffixes, powers of 1000 (default 5B = 5e9 "
                        "bytes; 0: no limit, one shard, as mergekit)")
    p.add_argument("--random-seed", type=seed, default=0,
                   help="seed of the counter-based generator used by DARE and DELLA (default 0)")
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write a README.md model card: the method, the models and the config (default on, as "
                        "mergekit's)")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base model's tokenizer files (default on); a tokenizer built from "
                        "tokenizer_source or tokenizer: is written either way")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--strict", action="store_true",
                   help="refuse parameters the merge method does not declare, a YAML key given twice in one mapping, "
                        "an empty parameter list, other keys than filter and value in a filter entry, true/false "
                        "where a number belongs, and keys mergekit does not know at the top level or in tokenizer: "
                        "(by default: each with a warning, read as mergekit reads it)")
    p.add_argument("--allow-crimes", action=argparse.BooleanOptionalAction, default=False,
                   help="allow merging models whose config.json architectures differ")
    p.add_argument("-j", "--num-threads", type=thread_count, default=None,
                   help=f"CPU threads for the math (at most {MAX_THREADS})")
    p.add_argument("--prefetch", type=positive_int, default=2, help="tensor groups read ahead of compute (default 2)")
    p.add_argument("--direct-io", choices=("auto", "on", "off"), default="auto",
                   help="bypass the page cache (O_DIRECT): auto (default) reads what the page cache already holds "
                        "plainly and the rest directly; on: reads everything directly; both write the output "
                        "directly; off: reads and writes through the page cache")
    add_quiet_argument(p)
    p.add_argument("--no-quiet", action="store_false", dest="quiet", help="progress bar and summary (the default)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (and the traceback of a failure)")
    p.add_argument("-V", "--version", action="version", version=f"merge-engine {__version__}")
    compat = "accepted for mergekit compatibility; no effect"
    for flag in _COMPAT_FLAGS:
        p.add_argument(flag, action=argparse.BooleanOptionalAction,
                       help=compat + ("; the output is safetensors either way (--no-safe-serialization warns so)"
                                      if flag == "--safe-serialization" else ""))
    p.add_argument("--gpu-rich", action="store_true", help=compat)
    p.add_argument("--write-threads", type=int, help=compat)
    p.add_argument("--lora-merge-cache", metavar="PATH", help=compat)  # adapters are applied while reading: no copies
    p.add_argument("--transformers-cache", metavar="PATH",
                   help="the Hugging Face cache that models named by Hub id (org/name[@revision]) are found in "
                        "(default: huggingface_hub's, HF_HUB_CACHE); nothing is downloaded")
    p.add_argument("--unsafe-truncate-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="without a tokenizer setting, embeddings and LM heads whose vocab_size differs keep the rows "
                        "every input has, token ids assumed to mean the same (as mergekit's; unsafe)")
    p.add_argument("--lora-merge-dtype", type=lora_merge_dtype, metavar="DTYPE",
                   help="read BASE+ADAPTER models cast to this dtype and merge their adapters in it, as mergekit's "
                        f"({', '.join(DTYPES)}; default: each base tensor's own dtype)")
    p.add_argument("--expert-layout", choices=("fused", "checkpoint"), default="fused",
                   help="MoE experts: fused (default) merged and written as transformers 5 holds them and mergekit "
                        "writes them, one gate_up_proj and one down_proj per layer; checkpoint: one tensor per expert "
                        "and projection, as the checkpoints store them")


def merge_options(args: argparse.Namespace):
    """The MergeOptions of add_merge_options' arguments (with the notes on mergekit's flags that change nothing
    here logged, and the thread count set)."""
    from merge_engine.engine import MergeOptions
    for (dest, value), note in FLAG_NOTES.items():
        if getattr(args, dest) is value:
            log.warning(note)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    return MergeOptions(device=args.device or "auto", out_shard_size=args.out_shard_size,
                        random_seed=args.random_seed, copy_tokenizer=args.copy_tokenizer,
                        overwrite=args.overwrite, prefetch=args.prefetch, direct_io=args.direct_io,
                        quiet=args.quiet, allow_crimes=args.allow_crimes,
                        unsafe_truncate_embeddings=args.unsafe_truncate_embeddings,
                        lora_merge_dtype=args.lora_merge_dtype, expert_layout=args.expert_layout,
                        hub_cache=args.transformers_cache, write_model_card=args.write_model_card)


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    options = merge_options(args)
    from merge_engine.distributed import current_ranks, every_rank, torchrun_group
    from merge_engine.engine import load_checked_config, merge
    from merge_engine.io.writer import check_output_apart
    with torchrun_group() as leader:
        started = time.perf_counter()
        # a step: under torchrun, a rank that refuses its config tells the others, who would otherwise wait for it
        # in merge()'s first collective until torchrun kills them
        with every_rank(current_ranks(), "reading the config"):
            # the config first, so that a folder given as the config is named as such
            config = load_checked_config(args.config, strict=args.strict, hub_cache=args.transformers_cache)
            check_output_apart(args.out_dir, [args.config])  # --overwrite would delete a config kept in OUT
        config_seconds = time.perf_counter() - started
        options.quiet = args.quiet or not leader  # one progress bar and summary: rank 0's
        report = merge(config, args.out_dir, options)
    if not options.quiet:
        print(report.summary())
    if args.verbose:
        log.debug("time: %s", time_breakdown(report, config_seconds))
    return 0


def time_breakdown(report, config_seconds: float) -> str:
    """Where the command's time went, from its process' start: startup (interpreter, first imports), the
    command's imports (torch...), then merge()'s own steps, reading the config included."""
    steps = {k: v for k, v in STARTUP.items() if v is not None}
    steps.update(report.phases)
    steps["config"] += config_seconds
    return ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()) + f"; total {sum(steps.values()):.2f} s"
