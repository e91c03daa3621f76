"""`merge-engine tokensurgeon MODEL DONOR OUT [options]`: MODEL with DONOR's tokenizer (mergekit-tokensurgeon
compatible), merge_engine/tokensurgeon.py."""
from __future__ import annotations

import argparse

from merge_engine.cli.args import setup_logging
from merge_engine.cli.merge import add_merge_options, merge_options


def build_parser() -> argparse.ArgumentParser:
    from merge_engine.token_approximation import SUBWORD_METHODS, WEIGHT_SCHEMES
    from merge_engine.tokensurgeon import MATCH_CHOICES, METHODS
    p = argparse.ArgumentParser(
        prog="merge-engine tokensurgeon",
        description="Give a model a donor model's tokenizer, as mergekit-tokensurgeon does: the embeddings and head "
                    "rebuilt in the donor's token order, each token the model has keeping its row and the others "
                    "approximated from the donor's rows.",
        epilog="Merge options that concern a merge (--allow-crimes, --lora-merge-cache, ...) are accepted for "
               "mergekit compatibility and change nothing here.")
    p.add_argument("model", help="the model to change (folder, BASE+ADAPTER or Hub id)")
    p.add_argument("donor", help="the model whose tokenizer it takes")
    p.add_argument("out_path", help="the output folder")
    p.add_argument("-k", "--k", type=int, default=64, help="shared tokens per approximation (default 64)")
    p.add_argument("-c", "--cosine-similarity", action=argparse.BooleanOptionalAction, default=False,
                   help="common_interpolation: nearest by cosine rather than euclidean distance")
    p.add_argument("-nc", dest="cosine_similarity", action="store_false", help="--no-cosine-similarity")
    p.add_argument("-a", "--approximation-method", choices=METHODS, default="omp",
                   help="how rows of tokens the model lacks are made (default omp)")
    p.add_argument("-w", "--weight-scheme", choices=WEIGHT_SCHEMES, default="distance_proportional",
                   help="common_interpolation's weights (default distance_proportional)")
    p.add_argument("-s", "--subword-method", choices=SUBWORD_METHODS, default="mean",
                   help="subword: how the pieces' rows combine (default mean)")
    p.add_argument("--batch-size", type=int, default=512, help="tokens approximated at once; -1: all (default 512)")
    p.add_argument("-pm", "--prefix-match", choices=MATCH_CHOICES, default="no",
                   help="take the row of a token's longest prefix the model has, in these matrices (default no)")
    p.add_argument("-bm", "--byte-match", choices=MATCH_CHOICES, default="no",
                   help="take the row of the byte token naming the same character, in these matrices (default no)")
    p.add_argument("--magikarp", action=argparse.BooleanOptionalAction, default=False,
                   help="leave out tokens under-trained in either model; zero those under-trained in both")
    p.add_argument("-nvn", "--new-vocab-noise", type=float, default=None, help="add normal noise of this scale to "
                   "approximated rows")
    p.add_argument("-nvs", "--new-vocab-scale", type=float, default=None, help="scale approximated rows by this")
    add_merge_options(p)
    return p


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    options = merge_options(args)
    from merge_engine.tokensurgeon import SurgeryOptions, transplant_tokenizer
    report = transplant_tokenizer(args.model, args.donor, args.out_path, SurgeryOptions(
        method=args.approximation_method, k=args.k, cosine_similarity=args.cosine_similarity,
        weight_scheme=args.weight_scheme, subword_method=args.subword_method, batch_size=args.batch_size,
        prefix_match=args.prefix_match, byte_match=args.byte_match, magikarp=args.magikarp,
        new_vocab_noise=args.new_vocab_noise, new_vocab_scale=args.new_vocab_scale,
        random_seed=options.random_seed, device=options.device, out_shard_size=options.out_shard_size,
        overwrite=options.overwrite, hub_cache=options.hub_cache, quiet=options.quiet))
    if not options.quiet:
        print(report.summary())
    return 0
