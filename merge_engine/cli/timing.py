"""Where a command's time goes before its own work: filled by main(), printed by `merge-engine -v`.
No torch here: main() reads the clock before the commands' imports load it."""
from __future__ import annotations

import os
import time

STARTUP: dict[str, float | None] = {}  # seconds from process start to main(), and of the command's imports
EXECUTABLE = [False]  # set by the `merge-engine` executable: the process is the command (not a caller's main())


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat against CLOCK_BOOTTIME, to the kernel's
    clock tick), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None
