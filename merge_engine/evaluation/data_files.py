"""Reading a scorer's data file, and reporting every problem found in it at once."""
from __future__ import annotations

import io

from merge_engine.errors import CheckpointError, ConfigError
from merge_engine.io.untrusted import open_regular

SHOWN_PROBLEMS = 20  # a file broken on every line would otherwise print thousands of lines


def read_text(path: str) -> tuple[str | None, list[str]]:
    """The file's text, or None and the problem: missing, unreadable, not a regular file (a FIFO would block) or
    not UTF-8."""
    try:
        # universal newlines, as open() reads; a leading byte-order mark (some editors write one) is not text
        with io.TextIOWrapper(open_regular(path), encoding="utf-8-sig") as f:
            return f.read(), []
    except CheckpointError as e:
        return None, [str(e)]
    except OSError as e:
        return None, [f"{path}: cannot read ({e.strerror or e})"]
    except UnicodeDecodeError as e:
        return None, [f"{path}: not UTF-8 text (byte {e.start})"]


def raise_problems(problems: list[str], source: str) -> None:
    """Raise one ConfigError listing the problems (the first SHOWN_PROBLEMS and a count), if there are any."""
    if not problems:
        return
    shown = problems[:SHOWN_PROBLEMS]
    if len(problems) > SHOWN_PROBLEMS:
        shown.append(f"and {len(problems) - SHOWN_PROBLEMS} more")
    raise ConfigError(shown, source)
