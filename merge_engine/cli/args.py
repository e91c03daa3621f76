"""Argument types and argument groups the subcommands share."""
from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings

from merge_engine.dtypes import STATS_DTYPES
from merge_engine.errors import MergeEngineError, printable
from merge_engine.progress import write_above_bars

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBgGtT]?)\s*$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """'5B', '500M', '2k' or plain bytes -> bytes (K/M/B(G)/T are powers of 1000, as in mergekit)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size '{text}' (examples: 5B, 500M, 1000000)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def shard_size(text: str) -> int:
    """parse_size, where 0 is no limit (as mergekit's --out-shard-size 0); a fraction of a byte, which would round
    down to that 0, is refused."""
    value = parse_size(text)
    if value == 0 and float(_SIZE.match(text)[1]) != 0:
        raise argparse.ArgumentTypeError(f"expected 0 (no limit) or a size of at least 1 byte, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


MAX_THREADS = 4096  # more than any machine's CPUs: torch starts as many threads as asked, and past the system's limit crashes


def thread_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {text}")
    return value


def regex(text: str) -> str:
    """A regular expression, compiled when the arguments are read (so a bad one fails before any work)."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({e})") from None
    return text


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL DATA OUT and how DATA is batched: the statistics commands (fisher, stats) share them."""
    p.add_argument("model", metavar="MODEL",
                   help="local Hugging Face model folder (safetensors weights, config.json, tokenizer)")
    p.add_argument("data", metavar="DATA",
                   help="plain text (one example per non-blank line) or .jsonl/.json ({\"text\": ...} per line)")
    p.add_argument("out_dir", metavar="OUT", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch (default 8)")
    p.add_argument("--max-length", type=positive_int, default=None, help="tokens per example, truncated (default 512, "
                   "or the model's max_position_embeddings when fewer; more than that is refused)")
    p.add_argument("--max-examples", type=positive_int, default=None, help="use only the first N examples")


def add_model_arguments(p: argparse.ArgumentParser, dtypes: tuple[str, ...] = STATS_DTYPES) -> None:
    p.add_argument("--device", default="auto", help="where the model runs: cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", choices=dtypes, default=None,
                   help="dtype the model is loaded and run in (default: as stored in the checkpoint)")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_quiet_argument(p)
    add_verbose_argument(p)


def add_quiet_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and the traceback of a failure")


def subcommand(sub, name: str, what: str, usage: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose own --help says what it does, as the list of its command's --help does; -v as every
    command's."""
    p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".", usage=usage)
    add_verbose_argument(p)
    return p


def run_subcommand(parser: argparse.ArgumentParser, commands: dict, argv: list[str]) -> int:
    """Parse argv and run commands[args.command](args, parser); an OSError on a file the command reads or
    writes is reported like the engine's own errors (one line, exit 2)."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "quiet", False), args.verbose)  # warnings on one line, as every command's
    try:
        return commands[args.command](args, parser)
    except BrokenPipeError:  # standard output's reader went away (`key report ... | head`): main() ends quietly
        raise
    except OSError as e:
        raise MergeEngineError(str(e)) from e


def model_items_out(args, parser: argparse.ArgumentParser, command: str, item: str) -> tuple[str, list[str], str]:
    """MODEL ITEM [ITEM2 ...] (OUT | --in-place) from args.paths: (model, items, out; None in place)."""
    if len(args.paths) < (2 if args.in_place else 3):
        parser.error(f"{command} needs MODEL {item} [{item}2 ...] {'' if args.in_place else 'OUT'}".rstrip())
    model, *items = args.paths if args.in_place else args.paths[:-1]
    return model, items, None if args.in_place else args.paths[-1]


def print_recovery(model: str, what: str, recovered: bool) -> int:
    print(f"{model}: " + (f"rolled back an interrupted in-place {what}" if recovered else "nothing to recover"))
    return 0


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    handler = LineHandler()
    handler.setFormatter(_PrintableFormatter("%(message)s"))
    # other libraries' loggers (datasets, filelock, lm_eval...) say their warnings and errors only: with -v their
    # debug lines came by the hundred per search trial, burying the command's own
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # (none if set up)
    logging.getLogger("merge_engine").setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if not sys.warnoptions:  # every warning once per place, unless the user chose (-W, PYTHONWARNINGS)
        warnings.simplefilter("default")
    warnings.showwarning = _one_line_warning  # the command's own process: no source lines in warnings


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    write_above_bars(f"merge-engine: warning: {printable(str(message))}", file or sys.stderr)


class LineHandler(logging.StreamHandler):
    """Standard error's log lines, each on a line of its own above a progress bar shown there (a merge's warning
    about a tensor comes while its bar is shown)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_above_bars(self.format(record), self.stream)
        except RecursionError:  # as logging.StreamHandler
            raise
        except Exception:
            self.handleError(record)


class _PrintableFormatter(logging.Formatter):
    """Log lines as the command's other output: warnings prefixed as Python's are, another library's named (its
    warning is not merge-engine's), control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "merge-engine: warning: " if record.levelno == logging.WARNING else ""
        library = record.name.partition(".")[0]
        if library not in ("merge_engine", "root"):
            prefix += f"{library}: "
        return printable(prefix + super().format(record))
