"""`merge-engine patch ...`: weight patches; run(argv) handles the arguments after `patch`.

    patch extract BASE TUNED OUT [--storage auto|bfloat16|float16|float32|int8|int4|lora] [--rank R] [--energy E]
                  [--include S ...] [--exclude S ...] [--first-layers N | --top-norm SHARE] [--outside-layers]
                  [--table]
    patch norms BASE TUNED [--include S ...] [--exclude S ...]     the difference's norm per layer
    patch apply MODEL PATCH [PATCH2 ...] (OUT | --in-place) [--scale S ...] [--any-base]
    patch remove MODEL PATCH [PATCH2 ...] (OUT | --in-place) [--scale S ...] [--any-base]
    patch recover MODEL                                              roll back an interrupted --in-place command

Errors exit with status 2 and one line `merge-engine: error: ...` (merge_engine.cli.main); nothing is left behind.
"""
from __future__ import annotations

import argparse

from merge_engine.cli.args import model_items_out, positive_int, print_recovery, run_subcommand, subcommand
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.patches.apply import (
    MAX_SCALE,
    apply_patches,
    apply_patches_in_place,
    remove_patches,
    remove_patches_in_place,
)
from merge_engine.patches.extract import STORAGE_CHOICES, extract_patch
from merge_engine.patches.select import Selection, candidates, layer_norms, norm_table
from merge_engine.tiers.inplace import recover


def _scale(text: str) -> float:
    value = float(text)
    if not abs(value) <= MAX_SCALE:  # the differences are scaled in float32
        raise argparse.ArgumentTypeError(f"expected a finite number of at most {MAX_SCALE:.3g} in magnitude, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merge-engine patch", description="Weight patches: a fine-tune's difference "
                                "to its base, stored compactly, applied, rescaled, composed and removed.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    e = subcommand(sub, "extract", "store TUNED - BASE as a patch folder")
    e.add_argument("base", metavar="BASE", help="the base model folder")
    e.add_argument("tuned", metavar="TUNED", help="the fine-tuned model folder (same tensor names and shapes)")
    e.add_argument("out", metavar="OUT", help="patch folder to write (must not exist or be empty, unless "
                   "--overwrite)")
    e.add_argument("--storage", choices=STORAGE_CHOICES, default="auto", help="how differences are stored: a "
                   "float dtype (exact at scale 1, with fixups; default auto: the weights' own dtype), int8 or int4 "
                   "with a scale per row, or lora (a PEFT LoRA adapter folder, low rank per linear weight)")
    e.add_argument("--rank", type=positive_int, default=None, help="lora: the rank kept per module (32 unless --energy "
                   "is given; with --energy, the most a module keeps)")
    e.add_argument("--energy", type=_share, default=None, help="lora: keep the fewest singular values holding this "
                   "share of each module's squared difference norm")
    _add_filters(e)
    layers = e.add_mutually_exclusive_group()
    layers.add_argument("--first-layers", type=positive_int, default=None, metavar="N", help="store only layers 0..N-1")
    layers.add_argument("--top-norm", type=_share, default=None, metavar="SHARE", help="store only the fewest "
                        "layers carrying this share of the squared difference norm (reads the inputs twice)")
    e.add_argument("--outside-layers", action="store_true", help="with --first-layers or --top-norm: store the "
                   "tensors outside the layers (embeddings, final norm, head) too")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    e.add_argument("--table", action="store_true", help="print every stored tensor's size and error")
    e.add_argument("-q", "--quiet", action="store_true", help="no summary")
    n = subcommand(sub, "norms", "print the norm of TUNED - BASE per layer (to choose --first-layers or --top-norm)")
    n.add_argument("base", metavar="BASE", help="the base model folder")
    n.add_argument("tuned", metavar="TUNED", help="the fine-tuned model folder")
    _add_filters(n)
    for name, what in (("apply", "add patches to a model, each times its scale, in one pass"),
                       ("remove", "subtract patches from a model, each times the scale it was applied with")):
        a = subcommand(sub, name, what, usage="%(prog)s [-h] [-v] [--scale S ...] [--any-base] [--in-place] "
                                                 "[--overwrite] [-q] MODEL PATCH [PATCH2 ...] (OUT | --in-place)")
        a.add_argument("paths", nargs="+", metavar="MODEL PATCH [PATCH2 ...] OUT",
                       help="model folder, patch folders (merge_engine patches or PEFT LoRA adapters), and the "
                       "output folder (left out with --in-place)")
        a.add_argument("--scale", type=_scale, nargs="+", default=None, metavar="S", help="one scale per patch "
                       "(default 1: one float patch at scale 1 reproduces the fine-tune bit for bit)")
        a.add_argument("--any-base", action="store_true", help="skip the check that each changed tensor is the "
                       "patch's base (or, removing one exact patch, that the base comes back)")
        a.add_argument("--in-place", action="store_true", help="rewrite MODEL's files (crash-safe journal) "
                       "instead of writing OUT")
        a.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
        a.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    r = subcommand(sub, "recover", "roll back an interrupted --in-place apply or remove")
    r.add_argument("model", help="model folder an interrupted --in-place command left a journal in")
    return p


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", nargs="+", default=(), metavar="S", help="only tensors whose name contains one of "
                   "these substrings (as mergekit's parameter filters match)")
    p.add_argument("--exclude", nargs="+", default=(), metavar="S", help="leave out tensors whose name contains one "
                   "of these substrings")


def run(argv: list[str]) -> int:
    return run_subcommand(build_parser(), COMMANDS, argv)


def _extract(args, parser) -> int:
    if args.storage != "lora" and (args.rank is not None or args.energy is not None):
        parser.error("--rank and --energy size a low-rank patch: use them with --storage lora")
    selection = Selection(tuple(args.include), tuple(args.exclude), args.first_layers, args.top_norm,
                          args.outside_layers)
    report = extract_patch(args.base, args.tuned, args.out, args.storage, selection, args.rank, args.energy,
                           args.overwrite)
    if report.norms is not None and not args.quiet:
        print(norm_table(report.norms))
    if args.table:
        print(report.table())
    if not args.quiet:
        print(report.summary())
    return 0


def _norms(args, parser) -> int:
    base, tuned = Checkpoint(args.base), Checkpoint(args.tuned)
    try:
        names = candidates(base, tuned, Selection(tuple(args.include), tuple(args.exclude)))
        print(norm_table(layer_norms(base, tuned, names)))
    finally:
        base.close()
        tuned.close()
    return 0


def _apply_or_remove(args, parser) -> int:
    model, patch_paths, out = model_items_out(args, parser, f"patch {args.command}", "PATCH")
    scales = args.scale or [1.0] * len(patch_paths)
    if len(scales) != len(patch_paths):
        parser.error(f"--scale takes one value per patch: {len(patch_paths)} patches, {len(scales)} scales")
    patches, check = list(zip(patch_paths, scales)), not args.any_base
    if out is None:
        run = (apply_patches_in_place if args.command == "apply" else remove_patches_in_place)(model, patches, check)
    else:
        run = (apply_patches if args.command == "apply" else remove_patches)(model, patches, out, check,
                                                                             args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(run.summary())
    return 0


def _recover(args, parser) -> int:
    return print_recovery(args.model, "operation", recover(args.model))


COMMANDS = {"extract": _extract, "norms": _norms, "apply": _apply_or_remove, "remove": _apply_or_remove,
            "recover": _recover}
