"""A byte-counting progress bar (tqdm) that worker threads can update."""

from __future__ import annotations

import threading
from types import TracebackType

from tqdm import tqdm


class Progress:
    def __init__(self, total_bytes: int, description: str, enabled: bool) -> None:
        self._bar = tqdm(
            total=total_bytes,
            desc=description,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=None if enabled else True,  # None: off when stderr is not a terminal
            dynamic_ncols=True,
            leave=False,
        )
        self._lock = threading.Lock()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._bar.update(nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.close()
