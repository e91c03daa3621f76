"""The wall-clock budget of a search: durations as users write them, the clock, and what must stay in reserve.

Everything counts against the budget, from the start of the search: planning, reading the inputs, every
trial, and at the end the best merge's write and its test evaluation. Before each trial the search asks
whether that trial (as long as the longest so far) plus the reserve for the end still fits; the reserve is
estimated from measured rates (the output disk's write rate, the seconds per evaluated token of the trials)
with a margin.

Before any tensor is read, a lower bound of one trial's cost refuses budgets that cannot fit even one:
reading the inputs at the fastest rate storage reaches (READ_CEILING), evaluating at the device's measured
matrix-product rate (the faster of fp32 and the model's dtype), and writing the result at the measured write
rate.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

from merge_engine.errors import ConfigError, OutputError

READ_CEILING = 25e9  # bytes/s: above any NVMe array or page-cache copy of today; a lower bound of read time
MARGIN = 1.5  # the reserve for the end is this many times its estimate, plus SLACK seconds
SLACK = 2.0
PROBE_BYTES = 64 << 20  # the most the output disk's write rate is measured with
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float | int) -> float:
    """'50m', '1h30m', '90s', '3600' (seconds) -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
        if not parts or not any(parts.groups()):
            raise ConfigError([f"budget: a duration such as 50m, 1h30m, 90s or 3600, got {text!r}"])
        seconds = sum(float(v) * u for v, u in zip(parts.groups(), (3600, 60, 1)) if v)
    if not math.isfinite(seconds):  # 400 nines are inf seconds, and nan is no duration
        raise ConfigError([f"budget: a finite duration, got {str(text)[:40]!r}{'...' if len(str(text)) > 40 else ''}"])
    if not seconds > 0:
        raise ConfigError([f"budget: must be more than 0 seconds, got {text!r}"])
    return seconds


@dataclass
class Budget:
    seconds: float
    clock: Callable[[], float] = time.monotonic
    started: float | None = None  # the clock's reading when the budget began (default: now)

    def __post_init__(self):
        if self.started is None:
            self.started = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


def write_rate(folder: str, probe_bytes: int = PROBE_BYTES) -> float:
    """Bytes/s of a flushed write of probe_bytes into folder (the output disk; where it does not exist yet, its
    nearest existing parent: none is made before the search is known to run), measured now. The probe file has no
    name (O_TMPFILE, or unlinked at once), so a search killed while writing it leaves nothing behind."""
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    chunk = os.urandom(min(probe_bytes, 1 << 20))
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".write-probe-") as f:
            began = time.perf_counter()
            for done in range(0, probe_bytes, len(chunk)):
                f.write(chunk[:probe_bytes - done])
            f.flush()
            os.fsync(f.fileno())
            return probe_bytes / max(time.perf_counter() - began, 1e-6)
    except OSError as e:  # a probe no larger than the output: the output would not fit either
        raise OutputError(f"{folder}: cannot write {probe_bytes:,} bytes there, where the output goes "
                          f"({e.strerror or e})") from None


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matrix product on the device in dtype, measured now (a few tenths of a second)."""
    n = 1024 if device.type == "cuda" else 512
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype)  # not the caller's RNG
    a @ a  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began, reps = time.perf_counter(), 0
    while time.perf_counter() - began < 0.2:
        a @ a
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - began)


def reserve_seconds(write_seconds: float, test_seconds: float) -> float:
    """What to keep for the end: the best merge's write (the search passes it with the longest trial merge, as the
    end merges the best config again) and its test evaluation, with the margin."""
    return MARGIN * (write_seconds + test_seconds) + SLACK
