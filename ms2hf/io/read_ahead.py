"""Reading many small files (headers, strategy files) in order, with a few threads reading ahead.

On a cold page cache each read waits for the disk or the network; with several in flight the
storage is kept busy (a 4096-rank save's headers: 6-7 s one by one, 1-1.6 s eight at a time).
The caller still gets the results in order, on its own thread, and parses them there (it holds
the interpreter lock for that anyway). Only a few batches are read ahead of the caller, so what
is held at once stays a few hundred files' worth, whatever the number of files.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

THREADS = 8
BATCH = 16
"""Files per read task: enough to make a task's cost small beside its reads."""


def read_in_order(
    paths: Sequence[Path], read: Callable[[Path], T], threads: int = THREADS
) -> Iterator[T]:
    """``read(path)`` of every path, in order. An exception from ``read`` is raised when its
    file's turn comes, so the first failing file in order is the one reported."""
    if threads <= 1 or len(paths) <= BATCH:
        for path in paths:
            yield read(path)
        return
    starts = iter(range(0, len(paths), BATCH))

    def batch(at: int) -> tuple[list[T], Exception | None]:
        """The batch's results up to its first failure, and that failure."""
        done: list[T] = []
        try:
            for path in paths[at : at + BATCH]:
                done.append(read(path))  # noqa: PERF401  (kept up to a failure)
        except Exception as e:  # raised in the caller, at its file's turn
            return done, e
        return done, None

    with ThreadPoolExecutor(threads, thread_name_prefix="ms2hf-read") as pool:
        ahead: deque[Future[tuple[list[T], Exception | None]]] = deque(
            pool.submit(batch, at) for at in itertools.islice(starts, 2 * threads)
        )
        try:
            while ahead:
                values, error = ahead.popleft().result()
                at = next(starts, None)
                if at is not None and error is None:
                    ahead.append(pool.submit(batch, at))
                yield from values
                if error is not None:
                    raise error
        finally:
            for future in ahead:
                future.cancel()
