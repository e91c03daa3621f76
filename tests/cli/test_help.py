"""Every subcommand's --help describes every argument it takes."""
import argparse
import subprocess
import sys

import pytest

from merge_engine.cli import (
    bakllama,
    extract_lora,
    fisher,
    key,
    layershuffle,
    legacy,
    merge,
    moe,
    multi,
    patch,
    pytorch,
    search,
    stats,
    tokensurgeon,
)


def parsers() -> dict[str, argparse.ArgumentParser]:
    found = {"merge": merge.build_parser(), "stats": stats.build_parser(), "fisher": fisher.build_parser(),
             "search": search.build_parser(), "multi": multi.build_parser(),
             "moe": moe.build_parser(), "pytorch": pytorch.build_parser(), "extract-lora": extract_lora.build_parser(),
             "tokensurgeon": tokensurgeon.build_parser(), "legacy": legacy.build_parser(),
             "layershuffle": layershuffle.build_parser(), "bakllama": bakllama.build_parser()}
    for command, module in (("key", key), ("patch", patch)):
        parser = found[command] = module.build_parser()
        for action in parser._subparsers._group_actions:
            found.update({f"{command} {name}": sub for name, sub in action.choices.items()})
    return found


@pytest.mark.parametrize("name, parser", parsers().items())
def test_every_argument_is_described(name, parser):
    undescribed = [a.dest for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not undescribed, f"{name}: {undescribed}"


def test_stats_help_describes_its_output():
    text = stats.build_parser().format_help()
    assert "grams.json" in text and "See merge_engine" not in text


def test_merge_help_lists_every_registered_method():
    from merge_engine.methods import REGISTRY
    text = " ".join(merge.build_parser().format_help().split())
    assert all(name in text for name in REGISTRY)


def test_help_documents_options():
    out = subprocess.run([sys.executable, "-m", "merge_engine", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--device", "--out-shard-size", "--random-seed", "--copy-tokenizer", "--allow-crimes",
                 "--overwrite"):
        assert flag in out


def test_subcommand_dispatch_from_the_command_line():
    """`python -m merge_engine fisher ...` reaches the fisher parser; the merge help names the subcommand."""
    out = subprocess.run([sys.executable, "-m", "merge_engine", "fisher", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("usage: merge-engine fisher") and "--fisher-dtype" in out
    merge_help = subprocess.run([sys.executable, "-m", "merge_engine", "--help"], capture_output=True, text=True,
                                check=True).stdout
    assert "merge-engine fisher --help" in " ".join(merge_help.split()) and "merge-engine multi --help" in " ".join(
        merge_help.split()) and "merge-engine moe --help" in " ".join(merge_help.split())
