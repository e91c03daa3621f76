"""Command line: main() is the one entry of every subcommand.

    merge-engine CONFIG.yml OUTPUT_DIR [options]         merge (mergekit-yaml compatible)
    merge-engine fisher MODEL DATA OUT [options]         diagonal Fisher of a model over a data set
    merge-engine stats MODEL DATA OUT [options]          input Gram matrices of its linear layers (RegMean, BMM)
    merge-engine key generate|apply|remove|recover|report|compare ...   tier keys

A first argument naming a subcommand selects it; anything else is a merge (a config file named like a
subcommand can be passed as ./NAME). Errors print one line `merge-engine: error: ...` and exit 2.
"""
from __future__ import annotations

import sys

from merge_engine.cli import fisher, key, merge, stats
from merge_engine.errors import MergeEngineError
from merge_engine.runtime import tune_process_for_merging

SUBCOMMANDS = {"fisher": fisher.run, "key": key.run, "stats": stats.run}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    tune_process_for_merging()  # this process exists to merge: see merge_engine/runtime.py
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = SUBCOMMANDS[argv[0]], argv[1:]
    else:
        command = merge.run
    try:
        return command(argv)
    except MergeEngineError as e:
        print(f"merge-engine: error: {e}", file=sys.stderr)
        return 2
