"""Progress bars: tqdm's (tqdm.auto: a notebook's where one runs), made by progress_bar. tqdm starts its
monitor thread for every bar, disabled ones included, and only a shown bar's close stops it: a quiet call
(MergeOptions(quiet=True), progress=False) would leave that thread running in its caller's process."""
from tqdm.auto import tqdm


class _QuietBar(tqdm):
    monitor_interval = 0  # no monitor thread (it only redraws shown bars that stalled)


def progress_bar(*args, disable: bool, **kwargs) -> tqdm:
    """tqdm(*args, disable=disable, **kwargs); a disabled bar starts no thread."""
    return (_QuietBar if disable else tqdm)(*args, disable=disable, **kwargs)
