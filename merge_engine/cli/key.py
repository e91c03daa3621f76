"""`merge-engine key ...`: tier keys; run(argv) handles the arguments after `key`.

    key generate CONFIG_OR_MODEL OUT.json (--secret-file F | --passphrase-env VAR) [--fraction 0.05]
                 [--fraction-of swappable|model] [--attention-share 0.25] [--attn-mode full|out]
                 [--mlp-mode both|up|down]
    key apply MODEL KEY [KEY2 ...] (OUT | --in-place)      keys applied in the order given (tiers)
    key remove MODEL KEY [KEY2 ...] (OUT | --in-place)     the same keys, in the order they were applied
    key recover MODEL                                      roll back an interrupted --in-place command
    key report MODEL KEY [KEY2 ...]                        parameters moved, per layer
    key compare MODEL KEY [KEY2 ...] PROMPTS               KL(keyed || public) and top-1 agreement per prompt

Errors exit with status 2 and one line `merge-engine: error: ...` naming the file at fault (merge_engine.cli.main);
nothing is left behind.
"""
from __future__ import annotations

import argparse
import os

from merge_engine.cli.args import (
    add_model_arguments,
    model_items_out,
    positive_int,
    print_recovery,
    run_subcommand,
    subcommand,
)
from merge_engine.distributed import current_ranks, every_rank, torchrun_group
from merge_engine.dtypes import dtype_named
from merge_engine.errors import CheckpointError, MergeEngineError, OutputError
from merge_engine.extras import require
from merge_engine.io.untrusted import open_regular, read_json
from merge_engine.runtime import launched_by_torchrun
from merge_engine.tiers.apply import apply_key, check_streamed_output, remove_key
from merge_engine.tiers.blocks import BLOCK_KINDS, model_blocks
from merge_engine.tiers.compare import compare_prompts
from merge_engine.tiers.generate import ATTN_MODES, FRACTION_OF, MLP_MODES, generate_key, parameter_count
from merge_engine.tiers.inplace import apply_key_in_place, recover, remove_key_in_place
from merge_engine.tiers.key import TierKey, TierKeyError
from merge_engine.tiers.report import key_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merge-engine key", description="Tier keys: swaps of attention heads and MLP "
                                "columns across layers that turn a public model into a keyed one and back.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    g = subcommand(sub, "generate", "derive a key from a secret for a model")
    g.add_argument("config", metavar="CONFIG_OR_MODEL", help="config.json, or a model folder holding one")
    g.add_argument("out", metavar="OUT.json", help="key file to write (owner-readable only)")
    secret = g.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret-file", metavar="F", help="secret: every byte of F (a trailing newline included)")
    secret.add_argument("--passphrase-env", metavar="VAR", help="secret: the environment variable VAR (UTF-8)")
    g.add_argument("--fraction", type=float, default=0.05, help="share of the parameters to key (0.05), counted as "
                   "--fraction-of says")
    g.add_argument("--fraction-of", choices=FRACTION_OF, default="swappable", help="what --fraction is a share of: "
                   "the swappable parameters (default; the reference generator's --target_pct) or all the model's "
                   "(its --target_total_pct; counted from the model folder's headers, or for a config.json alone by "
                   "building the model on the meta device, which needs the [hf] extra)")
    g.add_argument("--attention-share", type=float, default=0.25, help="share of the keyed parameters in attention "
                   "heads (0.25); the rest are MLP columns")
    g.add_argument("--attn-mode", choices=tuple(ATTN_MODES), default="full", help="attention swaps: whole heads "
                   "(full: q/k/v rows and o columns; default) or o columns only (out: attn_out_heads)")
    g.add_argument("--mlp-mode", choices=tuple(MLP_MODES), default="both", help="MLP swaps: whole columns (both: "
                   "up/gate rows and down column; default), up/gate rows only (up: mlp_up_cols) or the down column "
                   "only (down: mlp_down_cols)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing key file")
    g.add_argument("-q", "--quiet", action="store_true", help="no summary of the key written")
    for name, what in (("apply", "key a model: apply keys, in the order given (tiers)"),
                       ("remove", "unkey a model: remove keys, listed in the order they were applied")):
        a = subcommand(sub, name, what, usage="%(prog)s [-h] [-v] [--in-place] [--overwrite] [-q] "
                                                 "MODEL KEY [KEY2 ...] (OUT | --in-place)")
        a.add_argument("paths", nargs="+", metavar="MODEL KEY [KEY2 ...] OUT",
                       help="model folder, key files, and the output folder (left out with --in-place)")
        a.add_argument("--in-place", action="store_true", help="rewrite MODEL's files (crash-safe journal) "
                       "instead of writing OUT")
        a.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
        a.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary of the tensors rewritten")
    r = subcommand(sub, "recover", "roll back an interrupted --in-place apply or remove")
    r.add_argument("model", help="model folder an interrupted --in-place command left a journal in")
    rep = subcommand(sub, "report", "parameters a key moves, per layer")
    rep.add_argument("model", help="model folder the keys were made for")
    rep.add_argument("keys", nargs="+", metavar="KEY", help="key files, in the order they are applied")
    c = subcommand(sub, "compare", "public vs keyed next-token distributions on prompts (KL, top-1 agreement)",
                    usage="%(prog)s [-h] [options] MODEL KEY [KEY2 ...] PROMPTS")
    c.add_argument("paths", nargs="+", metavar="MODEL KEY [KEY2 ...] PROMPTS",
                   help="model folder (with a tokenizer), keys in the order applied, prompts file: plain text (one "
                   "prompt per line) or .jsonl/.json with a \"text\" field per line")
    c.add_argument("--max-length", type=positive_int, default=128, help="tokens per prompt, truncated (128)")
    c.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward (8)")
    c.add_argument("--max-examples", type=positive_int, default=None, help="use only the first N prompts")
    add_model_arguments(c, ("float32", "bfloat16", "float64"))
    return p


def run(argv: list[str]) -> int:
    return run_subcommand(build_parser(), COMMANDS, argv)


def _one_process(args) -> None:
    """Refuse a command that would run whole on every rank under torchrun: each would write the same key file
    (all but the first then failing on it) or roll back the same in-place operation."""
    if launched_by_torchrun():
        raise MergeEngineError(f"key {args.command} runs in one process, not under torchrun")


def _generate(args, parser) -> int:
    _one_process(args)
    path = os.path.join(args.config, "config.json") if os.path.isdir(args.config) else args.config
    for given in [path] + ([args.secret_file] if args.secret_file else []):  # even with --overwrite
        if os.path.exists(args.out) and os.path.exists(given) and os.path.samefile(args.out, given):
            raise OutputError(f"{args.out}: the key would replace its own input {given}; write it elsewhere")
    config = _read_config(path)
    blocks = model_blocks(config, path)
    total = parameter_count(args.config, config) if args.fraction_of == "model" else None
    key = generate_key(config, _secret(args), args.fraction, args.attention_share, source=path,
                       fraction_of=args.fraction_of, total_params=total, attn_mode=args.attn_mode,
                       mlp_mode=args.mlp_mode)
    key.save(args.out, overwrite=args.overwrite)
    if not args.quiet:
        counted = sum(2 * len(key.swaps(k)) * blocks.counted_per_block(k) for k in BLOCK_KINDS if key.swaps(k))
        swaps = ", ".join(f"{len(key.swaps(k))} {k}" for k in BLOCK_KINDS if key.swaps(k)) or "no swaps"
        of_model = f", {100 * counted / total:.2f}% of the model's {total:,}" if total else ""
        swappable = blocks.swappable((ATTN_MODES[args.attn_mode], MLP_MODES[args.mlp_mode]))  # what --fraction counts
        print(f"wrote {args.out}: {swaps}; {counted:,} parameters ({100 * counted / swappable:.2f}% "
              f"of the {swappable:,} swappable{of_model})")
    return 0


def _read_config(path: str) -> dict:
    try:  # a regular file (a FIFO would block forever) of at most 64 MiB, strict JSON
        return read_json(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: cannot read the model config ({str(e).removeprefix(f'{path}: ')})") from None


def _secret(args) -> bytes:
    if args.secret_file:
        try:
            with open_regular(args.secret_file) as f:  # a FIFO would block forever
                secret = f.read()
        except CheckpointError as e:
            raise TierKeyError(f"{args.secret_file}: cannot read the secret file "
                               f"({str(e).removeprefix(f'{args.secret_file}: ')})") from None
        except OSError as e:
            raise TierKeyError(f"{args.secret_file}: cannot read the secret file ({e.strerror})") from e
        where = args.secret_file
    else:
        secret = os.environ.get(args.passphrase_env, "").encode()
        where = f"environment variable {args.passphrase_env}"
    if not secret:
        raise TierKeyError(f"{where}: the secret is empty or missing")
    return secret


def _apply_or_remove(args, parser) -> int:
    model, key_paths, out = model_items_out(args, parser, f"key {args.command}", "KEY")
    if out is None:
        if launched_by_torchrun():  # every rank would rewrite the same files
            raise MergeEngineError(f"key {args.command} --in-place runs in one process, not under torchrun")
        keys = [TierKey.load(p) for p in key_paths]
        run = (apply_key_in_place if args.command == "apply" else remove_key_in_place)(model, keys)
        leader = True
    else:
        with torchrun_group() as leader:  # under torchrun, the ranks share the output's shards
            # a step: a rank that cannot read a key tells the others, who would otherwise wait for it
            with every_rank(current_ranks(), "reading the keys"):
                check_streamed_output(model, out, key_paths)  # before anything is read: --overwrite replaces OUT
                keys = [TierKey.load(p) for p in key_paths]
            run = (apply_key if args.command == "apply" else remove_key)(model, keys, out, args.overwrite,
                                                                          progress=not args.quiet)
    if not args.quiet and leader:
        print(run.summary())
    return 0


def _recover(args, parser) -> int:
    _one_process(args)
    return print_recovery(args.model, "key operation", recover(args.model))


def _report(args, parser) -> int:
    print(key_report(args.model, [TierKey.load(p) for p in args.keys]).table())
    return 0


def _compare(args, parser) -> int:
    if len(args.paths) < 3:
        parser.error("key compare needs MODEL KEY [KEY2 ...] PROMPTS")
    require("transformers", "hf", "merge-engine key compare")
    model, *key_paths, prompts = args.paths
    comparison = compare_prompts(model, [TierKey.load(p) for p in key_paths], prompts, args.max_length,
                                 args.batch_size, args.max_examples, args.device, dtype_named(args.dtype))
    print(comparison.table())
    return 0


COMMANDS = {"generate": _generate, "apply": _apply_or_remove, "remove": _apply_or_remove, "recover": _recover,
            "report": _report, "compare": _compare}
