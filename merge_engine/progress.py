"""Progress bars: tqdm's (tqdm.auto: a notebook's where one runs), made by progress_bar, leaving nothing behind
in the caller's process. tqdm's defaults would: its monitor thread, which every bar starts (disabled ones
included) and tqdm 4.70 never stops, and its lock, whose multiprocessing half fixes the process's start method."""
import threading

from tqdm.auto import tqdm


class _Bar(tqdm):
    monitor_interval = 0  # no monitor thread (it only redraws shown bars that stalled)
    # a thread lock: a multiprocessing lock would make a caller's later set_start_method fail ("context has
    # already been set")
    _lock = threading.RLock()


def progress_bar(*args, disable: bool, **kwargs) -> tqdm:
    """tqdm(*args, disable=disable, **kwargs), starting no thread."""
    return _Bar(*args, disable=disable, **kwargs)
