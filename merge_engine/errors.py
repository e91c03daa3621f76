"""Errors the engine reports to users. Each names the file and tensor at fault."""
import re


class MergeEngineError(Exception):
    """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class ConfigError(MergeEngineError):
    """One or more problems in a merge config; all of them are listed at once."""

    def __init__(self, problems: list[str], source: str | None = None, raw: object = None):
        self.problems = list(problems)
        self.source = source
        self.raw = raw  # the config as read, when it was a mapping (its model folders can still be checked)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class CheckpointError(MergeEngineError):
    """A checkpoint folder or file that cannot be read as asked."""


class OutputError(MergeEngineError):
    """The output location cannot be written as asked."""


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation failure says (Python's MemoryError, torch's CPU allocator's RuntimeError, CUDA's
    OutOfMemoryError), or None for any other exception."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" \
            or (isinstance(e, RuntimeError) and "can't allocate memory" in text):
        return text.split("] err == 0. ")[-1]  # (torch's CPU message starts with its source line)
    return None


def printable(message: str) -> str:
    """message with the control characters that names in it may hold (a path, a tensor name from a header) shown
    escaped, as \\x1b: raw, a terminal would act on them (colours, cursor moves, a cleared line). Line breaks and
    tabs stay: problem lists use them. For the command's own output (errors, warnings, log lines)."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], message)
