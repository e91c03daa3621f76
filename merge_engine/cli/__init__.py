"""Command line: main() is the one entry of every subcommand.

    merge-engine CONFIG.yml OUTPUT_DIR [options]         merge (mergekit-yaml compatible)
    merge-engine multi CONFIG.yml -I DIR [--out-path OUT]  merges that read each other (mergekit-multi compatible)
    merge-engine moe CONFIG.yml OUTPUT_DIR [options]     a mixture of experts of dense models (as mergekit-moe)
    merge-engine pytorch CONFIG.yml OUTPUT_DIR [-i|-u]   merge raw weight files (as mergekit-pytorch)
    merge-engine extract-lora --model M --base-model B --out-path OUT   a LoRA adapter (as mergekit-extract-lora)
    merge-engine fisher MODEL DATA OUT [options]         diagonal Fisher of a model over a data set
    merge-engine stats MODEL DATA OUT [options]          input Gram matrices of its linear layers (RegMean, BMM)
    merge-engine key generate|apply|remove|recover|report|compare ...   tier keys
    merge-engine patch extract|norms|apply|remove|recover ...          weight patches
    merge-engine search SEARCH.yml OUT_DIR --budget 50m  the best merge of search spaces within a time budget

A first argument naming a subcommand selects it; anything else is a merge (a config file named like a
subcommand can be passed as ./NAME). Errors print one line `merge-engine: error: ...` and exit 2.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback

from merge_engine import __version__
from merge_engine.cli.timing import EXECUTABLE, STARTUP, process_age
from merge_engine.errors import MergeEngineError, out_of_memory, printable
from merge_engine.interrupts import Terminated, signals_deferred
from merge_engine.runtime import launched_by_torchrun, tune_process_for_merging

# each the module merge_engine.cli.NAME (extract-lora: extract_lora) with run(argv); anything else is cli.merge
SUBCOMMANDS = ("bakllama", "extract-lora", "fisher", "key", "layershuffle", "legacy", "moe", "multi", "patch", "pytorch",
               "search", "stats", "tokensurgeon")
# commands without a distributed form (docs/distributed.md)
SINGLE_PROCESS = ("bakllama", "extract-lora", "layershuffle", "legacy", "moe", "multi", "patch", "pytorch", "search",
                  "tokensurgeon")


def main(argv: list[str] | None = None) -> int:
    """Run one command; every expected failure ends in one line on stderr (the traceback too with -v):
    exit 2 for an error, 130 for Ctrl-C, 143 for SIGTERM, 141 when standard output's reader went away (`... |
    head`). Clean-up (temporary folders, in-place rewrites rolled back) happens on the way out, for SIGTERM as for
    Ctrl-C."""
    try:
        try:
            return _command(argv)
        finally:  # here, not at the interpreter's exit: a closed pipe would get a traceback and status 120 there
            if sys.stdout is not None:  # None: started with standard output closed (`>&-`)
                sys.stdout.flush()
    except BrokenPipeError:  # as a shell's SIGPIPE (`| head`, `2>&1 | head`); --help and usage errors included
        _discard_closed_pipes()
        return 128 + signal.SIGPIPE


def _discard_closed_pipes() -> None:
    """Standard output and error, where their reader went away, write to /dev/null from here on: what they
    still hold would fail again at the interpreter's exit ('Exception ignored ... BrokenPipeError', status 120)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _command(argv: list[str] | None) -> int:
    STARTUP["process start"] = process_age()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["--version"], ["-V"]):
        print(f"merge-engine {__version__}")
        return 0
    # this process exists to merge (merge_engine/runtime.py); before the commands' modules are imported, as
    # they allocate tensors (torch reads its huge-page setting once, at its first CPU allocation)
    tune_process_for_merging()
    name = argv[0] if argv and argv[0] in SUBCOMMANDS else "merge"
    if name != "merge":
        argv = argv[1:]
    if name in SINGLE_PROCESS and launched_by_torchrun():  # every rank would do the whole job, on the same files
        return _failed(f"error: merge-engine {name} runs in one process, not under torchrun", 2, argv)
    try:
        with _terminate_as_interrupt():
            imported = time.perf_counter()
            with signals_deferred():  # Ctrl-C inside torch's import can be lost (the command runs on) or break it
                command = importlib.import_module(f"merge_engine.cli.{name.replace('-', '_')}")
            STARTUP["imports"] = time.perf_counter() - imported
            return command.run(argv)
    except MergeEngineError as e:
        return _failed(f"error: {e}", 2, argv)
    except BrokenPipeError:  # the reader of standard output went away (`... --table | head`): main() reports it
        raise
    except OSError as e:  # disk full, read-only folder, a file where a folder should be...
        return _failed(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", 2, argv)
    except Terminated:
        return _failed(f"terminated{_which_rank()}", 143, argv)
    except KeyboardInterrupt:
        return _failed("interrupted", 130, argv)
    except Exception as e:  # an allocation failure outside a merge's reads and computes: one line too
        reason = out_of_memory(e)
        if reason is None:
            raise
        return _failed(f"error: out of memory ({reason})", 2, argv)


def _which_rank() -> str:
    """Under torchrun, which rank this process is: a SIGTERM sent to one rank is then named where it landed."""
    return f" (rank {os.environ['RANK']} on {socket.gethostname()})" if launched_by_torchrun() else ""


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While a command runs (in the main thread, where Python takes signals), SIGTERM raises Terminated, once: a
    second SIGTERM must not interrupt the clean-up the first started. The previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The `merge-engine` executable: main(), then, after a merge or search that succeeded, an exit that skips the
    interpreter's teardown (0.6 s of torch's module clean-up on this machine, for a merge of a few
    seconds). The output is complete by then: written, fsynced, renamed; streams are flushed here."""
    EXECUTABLE[0] = True
    if getattr(sys.stdout, "errors", None) == "strict":  # as standard error's: a path or a tensor name that the
        sys.stdout.reconfigure(errors="backslashreplace")  # locale's encoding lacks is escaped, not a crash
    status = main()
    if status == 0 and _skips_teardown(sys.argv[1:]):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(status)


SINGLE_DASH_NAMES = ("-nvn", "-nvs")  # tokensurgeon's options (mergekit's names), not short flags run together


def _verbose(argv: list[str]) -> bool:
    """Whether the command line asks for -v: alone, repeated (-vv, as mergekit counts it) or among other
    short flags (-qv); not after `--`."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--verbose" or (arg[:1] == "-" and arg[1:2] != "-" and arg[1:].isalpha() and "v" in arg[1:]
                                  and arg not in SINGLE_DASH_NAMES):
            return True
    return False


def _skips_teardown(argv: list[str]) -> bool:
    """A merge (or several: multi), or a search (whose budget covers the process until it ends), that succeeded."""
    return (not (argv and argv[0] in SUBCOMMANDS) and argv not in (["--version"], ["-V"])) or argv[:1] in (
        ["search"], ["multi"])


def _failed(message: str, status: int, argv: list[str]) -> int:
    if _verbose(argv) and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"merge-engine: {printable(message)}", file=sys.stderr)
    return status

