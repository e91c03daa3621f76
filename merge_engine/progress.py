"""Progress bars: tqdm's (tqdm.auto: a notebook's where one runs), made by progress_bar. tqdm starts its
monitor thread for every bar, disabled ones included, and only a shown bar's close stops it: a quiet call
(MergeOptions(quiet=True), progress=False) would leave that thread running in its caller's process."""
import threading

from tqdm.auto import tqdm


class _Bar(tqdm):
    # a thread lock: tqdm's default one also makes a multiprocessing lock, which fixes the caller's
    # multiprocessing start method (a later set_start_method fails: "context has already been set")
    _lock = threading.RLock()


class _QuietBar(_Bar):
    monitor_interval = 0  # no monitor thread (it only redraws shown bars that stalled)


def progress_bar(*args, disable: bool, **kwargs) -> tqdm:
    """tqdm(*args, disable=disable, **kwargs); a disabled bar starts no thread."""
    return (_QuietBar if disable else _Bar)(*args, disable=disable, **kwargs)
