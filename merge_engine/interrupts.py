"""Holding Ctrl-C (SIGINT) and SIGTERM back while a step must not be cut in two. Imports no torch: the command
line uses it around torch's import."""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a job scheduler, docker stop), raised in the command's thread like Ctrl-C's
    KeyboardInterrupt, so that the same clean-up runs (the command line's handler raises it)."""


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM arriving inside the block take effect (their handlers run) at its end, not in the middle:
    from the main thread, where Python runs signal handlers; elsewhere the block is not interrupted anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # None: not Python's to swap; SIG_IGN: nothing to defer (catching it would wake a loop's wakeup fd)
    previous = {sig: handler for sig, handler in previous.items() if handler not in (None, signal.SIG_IGN)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):
            deliver(sig, previous[sig])


def deliver(sig: int, handler) -> None:
    """Run the handler of a signal that arrived while deferred. A Python handler is called, not sent the signal
    again: the signal's arrival already woke a wakeup fd (asyncio's add_signal_handler), which would see it twice."""
    if callable(handler):
        handler(sig, None)
    else:  # SIG_DFL: the default action
        signal.raise_signal(sig)
