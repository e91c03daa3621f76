import asyncio
import os
import signal
import socket
import threading

import pytest

from merge_engine.interrupts import signals_deferred


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_deferred_signal_reaches_the_callers_handler_once_at_the_end(signum):
    calls = []
    handler = lambda s, frame: calls.append(s)  # noqa: E731
    previous = signal.signal(signum, handler)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
            assert calls == []
        assert calls == [signum] and signal.getsignal(signum) is handler
    finally:
        signal.signal(signum, previous)


def test_an_asyncio_signal_handler_runs_once_for_a_deferred_signal():
    # asyncio learns of signals from its wakeup fd, which the signal's arrival inside the block already woke
    calls = []

    async def main():
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: calls.append("term"))
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == ["term"]


def test_an_ignored_signal_stays_ignored_and_wakes_no_wakeup_fd():
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    reader.setblocking(False)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wakeup = signal.set_wakeup_fd(writer.fileno())
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        with pytest.raises(BlockingIOError):
            reader.recv(16)
    finally:
        signal.set_wakeup_fd(wakeup)
        signal.signal(signal.SIGTERM, previous)
        reader.close()
        writer.close()


def test_nested_blocks_deliver_once_at_the_outer_end():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda s, frame: calls.append(s))
    try:
        with signals_deferred():
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
            assert calls == []
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_no_handler_is_swapped():
    errors = []

    def run():
        try:
            with signals_deferred():
                pass
        except Exception as e:  # signal.signal raises ValueError outside the main thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors == []


def test_the_default_int_handler_raises_keyboard_interrupt_at_the_end():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                reached = True
        assert reached
    finally:
        signal.signal(signal.SIGINT, previous)
