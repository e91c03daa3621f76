"""Argument types the subcommands share."""
import argparse

import pytest

from merge_engine.cli.args import parse_size, positive_int, positive_size


def test_parse_size():
    assert parse_size("5B") == 5 * 10**9 and parse_size("500M") == 5 * 10**8 and parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_positive_int():
    assert positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int("0")


def test_positive_size():
    assert positive_size("1") == 1 and positive_size("0.5K") == 500
    for text in ("0", "0.1"):  # 0.1 bytes rounds down to 0
        with pytest.raises(argparse.ArgumentTypeError, match=f"at least 1 byte, got {text}"):
            positive_size(text)
