"""Progress bars: tqdm's (tqdm.auto: a notebook's where one runs), made by progress_bar, leaving nothing behind
in the caller's process. tqdm's defaults would: its monitor thread, which every bar starts (disabled ones
included) and tqdm 4.70 never stops, and its lock, whose multiprocessing half fixes the process's start method.

Written to a log rather than a terminal (standard error redirected to a file or a pipe: CI, nohup, a job
scheduler's output file), a bar is a line when it starts, one at most every LOG_INTERVAL seconds, and one when it
ends. tqdm's redraws there, a carriage return and the whole bar again up to ten times a second, pile up as one
line growing by megabytes over a long merge, which log viewers show whole or as thousands of lines."""
import sys
import threading

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as notebook_tqdm
from tqdm.std import tqdm as std_tqdm

LOG_INTERVAL = 60.0  # seconds between a bar's lines in a log


class _Bar(tqdm):
    monitor_interval = 0  # no monitor thread (it only redraws shown bars that stalled)
    # a thread lock: a multiprocessing lock would make a caller's later set_start_method fail ("context has
    # already been set")
    _lock = threading.RLock()


class _Discarded:
    """Where a log bar's tqdm writes: its carriage returns, clearing and final line break (the lines are
    written by _LogBar.display)."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _LogBar(_Bar):
    """A bar in a log: each display a line of its own (in ASCII), the first, then one per LOG_INTERVAL seconds
    (set_postfix_str's redraws included), and the last, which close() displays, unless it repeats the line before."""

    def __init__(self, *args, file=None, bar_format=None, **kwargs):
        self._log = file or sys.stderr
        self._line_at, self._line = None, None  # when the last line was written, and what it said
        if bar_format:  # a bar without a percentage beside it (search's seconds) reads as noise in a line: "5   6/120"
            kwargs["bar_format"] = bar_format.replace("{bar} ", "").replace("{bar}", "")
        super().__init__(*args, file=_Discarded(), mininterval=LOG_INTERVAL, ascii=True, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        now = self._time()
        closing = self.disable  # close() disables the bar before it displays it the last time
        if msg is None and (closing or self._line_at is None or now - self._line_at >= LOG_INTERVAL):
            line = self.__str__().rstrip()
            if line != self._line:  # (the last line: often the one just written at the same count)
                self._log.write(line + "\n")
                self._log.flush()
            self._line_at, self._line = now, line
        return True


def write_above_bars(text: str, file) -> None:
    """text as a line of file's, above the bars shown there: on a terminal, written after a bar's text it joined
    the bar's line (which the bar's next redraw then wrote over); the bars are cleared, and drawn again after."""
    _Bar.write(text, file=file)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def progress_bar(*args, disable: bool, **kwargs) -> tqdm:
    """tqdm(*args, disable=disable, **kwargs), starting no thread; a line per stage and per LOG_INTERVAL seconds
    where the output is no terminal (nor a notebook)."""
    in_notebook = notebook_tqdm is not std_tqdm
    if disable or in_notebook or _is_terminal(kwargs.get("file") or sys.stderr):
        # rows as tqdm counts them where it cannot tell: a terminal's own count, 0 in a pseudo-terminal nobody
        # sized (`script` in CI, `docker run -t`), hid the bar (tqdm shows none at a position past the last row)
        return _Bar(*args, disable=disable, **{"nrows": 20, **kwargs})
    return _LogBar(*args, disable=disable, **kwargs)
