"""Progress bars on a terminal and in a log (standard error redirected to a file or a pipe)."""
import fcntl
import io
import os
import pty
import select
import struct
import sys
import termios

from merge_engine.progress import LOG_INTERVAL, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def ticking(bar, seconds: int, every: float = 1.0) -> None:
    """bar.update(1) every `every` seconds for `seconds` seconds of the bar's own (simulated) clock."""
    clock = [bar._time()]
    bar._time = lambda: clock[0]
    with bar:
        for _ in range(round(seconds / every)):
            clock[0] += every
            bar.update(1)


def test_a_bar_in_a_log_is_a_line_per_interval_not_a_carriage_return_per_redraw():
    """A merge of 10 minutes into a log: its start, a line a minute, its end; tqdm's redraws there were one line
    of thousands of carriage-return-separated bars (ten a second)."""
    log = io.StringIO()
    ticking(progress_bar(total=6000, desc="merging", disable=False, file=log), 600, every=0.1)
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == ""
    assert len(lines[:-1]) == 600 // LOG_INTERVAL + 1, lines
    assert lines[0].startswith("merging:   0%") and lines[-2].startswith("merging: 100%") and "6000/6000" in lines[-2]


def test_a_bar_in_a_log_throttles_the_postfix_redraws_too():
    """search sets its postfix after every trial, which redraws at once: in a log, still a line per interval."""
    log = io.StringIO()
    bar = progress_bar(total=600, desc="search", disable=False, file=log)
    clock = [bar._time()]
    bar._time = lambda: clock[0]
    with bar:
        for trial in range(300):
            clock[0] += 2
            bar.n = 2 * trial
            bar.set_postfix_str(f"trials {trial}")
    assert len(log.getvalue().splitlines()) == 600 // LOG_INTERVAL + 1


def test_a_bar_on_a_terminal_is_redrawn_in_place():
    terminal = Terminal()
    ticking(progress_bar(total=10, desc="merging", disable=False, file=terminal, mininterval=0), 10)
    assert terminal.getvalue().count("\r") >= 10 and terminal.getvalue().count("\n") == 1


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    with progress_bar(total=10, disable=True, file=log) as bar:
        bar.update(10)
    assert log.getvalue() == ""


def test_a_terminal_of_no_rows_shows_the_bar(monkeypatch):
    """A pseudo-terminal nobody sized (`script` in CI, `docker run -t`) reports 0 rows: tqdm took the bar's row 0
    for one past the screen's and showed nothing."""
    main_end, terminal_end = pty.openpty()
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 80, 0, 0))
    with os.fdopen(terminal_end, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)  # (tqdm asks only sys.stderr's size)
        with progress_bar(total=3, desc="merging", disable=False) as bar:
            bar.update(3)
        monkeypatch.undo()
    os.set_blocking(main_end, False)
    shown = b""
    while b"\n" not in shown and select.select([main_end], [], [], 5)[0]:  # up to the last line (reads return parts)
        try:
            shown += os.read(main_end, 4096)
        except OSError:  # (EIO: the terminal's end closed and drained)
            break
    os.close(main_end)
    assert b"merging: 100%" in shown, shown


def test_a_bar_in_a_log_drops_the_bar_of_a_custom_format():
    """search's format, the bar beside no percentage: its ASCII fill at 5% read '5' before the seconds."""
    log = io.StringIO()
    with progress_bar(total=120, desc="search", disable=False, file=log,
                      bar_format="{desc}: {bar} {n_fmt}/{total_fmt} s {postfix}") as bar:
        bar.n = 6
        bar.set_postfix_str("trials 4")
    assert log.getvalue().splitlines() == ["search: 0/120 s", "search: 6/120 s , trials 4"]
