"""Durations as users write them, and the budget's clock (merge_engine/search/budget.py)."""
from __future__ import annotations

import errno
import os

import pytest

from merge_engine.errors import ConfigError, OutputError
from merge_engine.search.budget import MARGIN, SLACK, Budget, parse_duration, reserve_seconds, write_rate


@pytest.mark.parametrize("text, seconds", [("50m", 3000), ("1h30m", 5400), ("90s", 90), ("3600", 3600), ("1.5h", 5400),
                                           (" 2m 30s ", 150), (45, 45), (0.5, 0.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5d", "-3m", "0", "m", "1h-2m", True, "9" * 400 + "s", "9" * 400,
                                  float("inf"), float("nan")])
def test_bad_durations_are_refused(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_duration(text)


def test_budget_counts_from_its_creation_on_its_clock():
    now = [10.0]
    budget = Budget(60, lambda: now[0])
    now[0] = 25.0
    assert budget.elapsed() == 15 and budget.left() == 45


def test_the_reserve_has_its_margin():
    assert reserve_seconds(4.0, 6.0) == MARGIN * 10.0 + SLACK


def test_the_write_probe_makes_no_folder_and_leaves_no_file_a_kill_would_strand(tmp_path, monkeypatch):
    # before, it made the output's parent folders (left behind when the search was then refused) and wrote a named
    # 64 MiB .write-probe-* file, which a search killed meanwhile left there for good
    seen = []
    fsync = os.fsync

    def listing_fsync(fd):
        seen.append(os.listdir(tmp_path))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", listing_fsync)
    assert write_rate(str(tmp_path / "new" / "parent"), 1 << 20) > 0
    assert seen == [[]] and os.listdir(tmp_path) == []


def test_a_probe_the_disk_refuses_names_the_folder(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=f"^{tmp_path}: cannot write 4,096 bytes .*No space left on device"):
        write_rate(str(tmp_path), 4096)
