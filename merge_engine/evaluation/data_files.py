"""Reading a scorer's data file, and reporting every problem found in it at once."""
from __future__ import annotations

from merge_engine.errors import ConfigError

SHOWN_PROBLEMS = 20  # a file broken on every line would otherwise print thousands of lines


def read_text(path: str) -> tuple[str | None, list[str]]:
    """The file's text, or None and the problem: missing, unreadable or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), []
    except OSError as e:
        return None, [f"{path}: cannot read the file ({e.strerror or e})"]
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
