"""in_order (merge_engine/patches/select.py): results in order, and a failed work item freeing what it held."""
from __future__ import annotations

import gc
import weakref

from merge_engine.patches.select import in_order


def test_results_come_in_the_order_of_the_names():
    assert list(in_order(lambda n: n * n, [3, 1, 2, 5], ahead=2)) == [(3, 9), (1, 1), (2, 4), (5, 25)]


class Held:
    """Stands for what the work holds (the checkpoints and their open files)."""


def failed_run() -> weakref.ref:
    """Iterate in_order over work that fails on its fourth item; a reference to what the work held (results read
    ahead of the failure)."""
    held = Held()

    def work(n: int) -> Held:
        if n == 3:
            raise OSError("read failed")
        return held
    try:
        for _ in in_order(work, list(range(6))):
            pass
    except OSError as e:
        assert str(e) == "read failed"
    else:
        raise AssertionError("the failure did not reach the caller")
    return weakref.ref(held)


def test_a_failed_item_leaves_nothing_for_the_garbage_collector():
    """Once the error of a failed item is dropped, what the work held is freed at once: no reference cycle through
    the generator's frame keeps it (in a process that extracts patches many times: open checkpoint files)."""
    gc.collect()
    gc.disable()
    try:
        assert failed_run()() is None
    finally:
        gc.enable()
