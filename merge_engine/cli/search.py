"""`merge-engine search SEARCH.yml OUT_DIR --budget 50m`: the best merge of a config's search spaces on
validation data, within a wall-clock budget (merge_engine/search)."""
from __future__ import annotations

import argparse
import time

from merge_engine.cli.args import add_output_arguments, positive_int, setup_logging
from merge_engine.cli.timing import EXECUTABLE, process_age
from merge_engine.search.budget import parse_duration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge-engine search",
        description="Search a merge config's parameter spaces ({search: [low, high]}, log: true, knots: K, "
                    "{choice: [...]}) for the best score on validation data, merging in memory (every input read "
                    "once), within a wall-clock budget that covers everything, the final write included.",
        epilog="SEARCH.yml is a mergekit config with search spaces and a `search:` section: objective (required: "
               "{kind: multiple_choice | perplexity | lm_eval, data: FILE, ...}), test, sampler (tpe, cmaes, gp), "
               "seed, trials, storage. OUT_DIR gets the best merged model, mergekit_config.yml (a plain config that "
               "merge-engine turns into the same files), trials.csv, search.json and search_journal.log. A killed "
               "search resumes from its journal (.OUT_DIR.search/journal.log beside OUT_DIR, or --storage).")
    p.add_argument("config", metavar="SEARCH.yml", help="the merge config with search spaces")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--budget", type=_duration, required=True,
                   help="wall-clock limit for everything, e.g. 50m, 1h30m, 600s or 600")
    p.add_argument("--trials", type=positive_int, default=None, help="at most this many trials in this run")
    p.add_argument("--sampler", choices=("tpe", "cmaes", "gp"), default=None, help="optuna's sampler (default tpe)")
    p.add_argument("--seed", type=int, default=None, help="the sampler's seed (default search.seed, else 0)")
    p.add_argument("--storage", default=None, help="the trials' journal file (default beside OUT_DIR)")
    p.add_argument("--test", default=None, metavar="FILE", help="score the best merge on this file too, like the objective")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--placement", choices=("auto", "device", "host"), default="auto",
                   help="where the inputs are held: on the device, or in pinned host memory (default: the device when "
                        "they fit)")
    p.add_argument("--lora", choices=("auto", "applied", "factored"), default="auto",
                   help="how LoRA inputs (BASE+ADAPTER) are held: applied once (a copy per expert; fastest trials) or "
                        "factored (the base once and each adapter; updates applied at every merge; least memory) "
                        "(default: applied when it fits)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random methods' drops (as merge-engine's)")
    p.add_argument("--transformers-cache", metavar="PATH",
                   help="the Hugging Face cache that models named by Hub id (org/name[@revision]) are found in "
                        "(default: huggingface_hub's, HF_HUB_CACHE); nothing is downloaded")
    add_output_arguments(p)
    return p


def _budget_joined(argv: list[str]) -> list[str]:
    """`--budget -5m` as `--budget=-5m`: argparse takes a value starting with "-" for an option (and would say
    "expected one argument"), where the duration's own check names what is wrong with it."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] == "--budget" and out[i + 1].startswith("-"):
            out[i:i + 2] = [f"--budget={out[i + 1]}"]
            break
    return out


def _duration(text: str) -> float:
    from merge_engine.errors import ConfigError
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(e.problems[0].removeprefix("budget: ")) from None


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(_budget_joined(argv))
    setup_logging(args.quiet, args.verbose)
    from merge_engine.search import SearchOptions, search
    # the budget covers the whole command: the executable's start-up (imports) counts; main() called in a longer
    # process starts it here
    age = process_age() if EXECUTABLE[0] else None
    result = search(args.config, args.out_dir, SearchOptions(
        budget=args.budget, device=args.device, placement=args.placement, lora=args.lora, sampler=args.sampler,
        seed=args.seed, trials=args.trials, storage=args.storage, test=args.test, overwrite=args.overwrite,
        random_seed=args.random_seed, hub_cache=args.transformers_cache, progress=not args.quiet,
        started=None if age is None else time.monotonic() - age))
    if not args.quiet:
        test = f", test {result.test_score:.4g}" if result.test_score is not None else ""
        print(f"best score {result.score:.4g}{test} after {result.trials} trials ({result.trials_this_run} in this run) "
              f"in {result.seconds:.1f} s -> {result.out_dir}")
    return 0
