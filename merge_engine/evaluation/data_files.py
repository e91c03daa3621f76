"""Reading a scorer's data file, and reporting every problem found in it at once."""
from __future__ import annotations

from merge_engine.errors import CheckpointError, ConfigError
from merge_engine.io.untrusted import open_regular

SHOWN_PROBLEMS = 20  # a file broken on every line would otherwise print thousands of lines


def read_text(path: str) -> tuple[str | None, list[str]]:
    """The file's text, or None and the problem: missing, unreadable, not a regular file (a FIFO would block) or
    not UTF-8 (naming the line and byte of the first bad byte)."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except CheckpointError as e:
        return None, [str(e)]
    except OSError as e:
        return None, [f"{path}: cannot read ({e.strerror or e})"]
    try:  # plain UTF-8: utf-8-sig counts an error's byte after a byte-order mark, not from the file's start
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = universal_newlines(data[:e.start].decode("utf-8")).count("\n") + 1
        return None, [f"{path}: not UTF-8 text (line {line}, byte {e.start})"]
    return universal_newlines(text).removeprefix("\ufeff"), []  # a byte-order mark (some editors write one) is not text


def universal_newlines(text: str) -> str:
    """Line ends as open() reads text: \\r\\n and \\r as \\n."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def raise_problems(problems: list[str], source: str) -> None:
    """Raise one ConfigError listing the problems (the first SHOWN_PROBLEMS and a count), if there are any."""
    if not problems:
        return
    shown = problems[:SHOWN_PROBLEMS]
    if len(problems) > SHOWN_PROBLEMS:
        shown.append(f"and {len(problems) - SHOWN_PROBLEMS} more")
    raise ConfigError(shown, source)
