"""Argument types the subcommands share."""
import argparse

import pytest

from merge_engine.cli.args import parse_size, positive_int, shard_size


def test_parse_size():
    assert parse_size("5B") == 5 * 10**9 and parse_size("500M") == 5 * 10**8 and parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_positive_int():
    assert positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int("0")


def test_shard_size():
    assert shard_size("1") == 1 and shard_size("0.5K") == 500
    assert shard_size("0") == shard_size("0B") == shard_size("0.0K") == 0  # no limit, as mergekit's --out-shard-size 0
    for text in ("0.1", "0.0001K"):  # a fraction of a byte would round down to that 0
        with pytest.raises(argparse.ArgumentTypeError, match=f"or a size of at least 1 byte, got {text}"):
            shard_size(text)
