"""Argument types the subcommands share."""
import argparse

import pytest

from merge_engine.cli.args import parse_size, positive_int


def test_parse_size():
    assert parse_size("5B") == 5 * 10**9 and parse_size("500M") == 5 * 10**8 and parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_positive_int():
    assert positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int("0")
