"""Read tiles ahead on a thread pool so reading overlaps compute.

OpenSlide and the JPEG decoders release the GIL, so a few threads keep a model fed.
Memory is bounded: at most ``max_pending`` results wait at any time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int = 2, max_pending: int = 8
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in the order of ``items``, computing up to ``max_pending`` ahead.

    ``workers=0`` runs ``fn`` in the calling thread (no read-ahead). An exception raised by
    ``fn`` is raised when its item's turn comes. Closing the iterator early cancels pending reads.

    >>> [r for _, r in read_ahead(lambda v: v * v, range(5), workers=2, max_pending=2)]
    [0, 1, 4, 9, 16]
    """
    if workers < 0 or max_pending < 1:
        raise ValueError(f"workers must be >= 0 and max_pending >= 1, got {workers}, {max_pending}")
    if workers == 0:
        for item in items:
            yield item, fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pdl1-read")
    pending: deque[tuple[T, Future[R]]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= max_pending:
                done_item, future = pending.popleft()
                yield done_item, future.result()
        while pending:
            done_item, future = pending.popleft()
            yield done_item, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
