"""Map a function over items on all cores, with a progress bar."""
from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity, unlike ``os.cpu_count``)."""
    return len(os.sched_getaffinity(0))


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int | None = None,
    desc: str = "",
    unit: str = "item",
    chunksize: int | None = None,
) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in completion order, with a tqdm bar (rate and ETA).

    ``workers=None`` uses every available core; ``workers=1`` runs in this process. Worker
    processes start from a fresh interpreter (forkserver), so a parent that has already started
    TensorFlow's threads cannot deadlock them; ``fn`` must therefore be picklable (a module-level
    function or a ``functools.partial`` of one).
    """
    items = list(items)
    workers = available_cores() if workers is None else max(1, workers)
    workers = min(workers, max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5)
    try:
        if workers == 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        chunksize = chunksize or max(1, min(64, len(items) // (workers * 8)))
        context = multiprocessing.get_context("forkserver")
        with context.Pool(workers, initializer=_leave_interrupts_to_the_parent) as pool:
            for result in pool.imap_unordered(fn, items, chunksize=chunksize):
                yield result
                bar.update()
    finally:
        bar.close()


def _leave_interrupts_to_the_parent() -> None:
    """A worker ignores Ctrl-C, which reaches every process of the terminal's group: the parent stops the pool,
    and the interruption is reported once, not once per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
