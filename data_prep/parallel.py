"""Order-preserving map over forked worker processes, shared by the data generator and stage 1's image cache."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator

_TASK: Callable | None = None  # the function the forked workers of `ordered_map` run (inherited, never pickled)


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity where the platform reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _run(item):
    return _TASK(item)


def _one_thread_each() -> None:
    """Worker start: torch (when the parent imported it) runs single-threaded, as in torch's DataLoader workers.

    The workers share the cores already, and a forked child must not enter the OpenMP thread pool its parent
    started: torch ops above OpenMP's grain size hung the workers when the parent had run parallel ops first.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def ordered_map(function: Callable, items: Iterable, workers: int, chunksize: int = 32) -> Iterator:
    """`map(function, items)`, in `workers` forked processes when > 1 and the platform can fork, else in this one.

    `function` may be a closure: the workers inherit it through the fork, only the items and results travel
    (so results should be plain data, e.g. numpy arrays rather than tensors).
    """
    global _TASK
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(function, items)
        return
    _TASK = function
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread_each) as pool:
            yield from pool.imap(_run, items, chunksize=chunksize)
    finally:
        _TASK = None
