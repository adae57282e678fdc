"""How much memory a run really took, for reports and benchmarks.

The resident size of a process that memory-maps its inputs counts every cached page of those
files, which the kernel drops at will; what the memory budget bounds is the anonymous part (band
buffers, headers, Python). So a background thread samples the anonymous resident size during
the run, next to the process's lifetime peak that ``getrusage`` keeps.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import psutil

SAMPLE_SECONDS = 0.02


def peak_rss_bytes() -> int:
    """The process's largest resident size so far (all of it, mapped file pages included)."""
    try:
        import resource
    except ImportError:  # Windows
        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def anonymous_rss_bytes(process: psutil.Process) -> int:
    """Resident memory not backed by a file: what the run owns, not the page cache it reads."""
    info = process.memory_info()
    return int(info.rss - getattr(info, "shared", 0))


class MemorySampler:
    """``with MemorySampler() as m: ...`` then ``m.peak_anonymous``, sampled every 20 ms."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ms2hf-memory", daemon=True)
        self.peak_anonymous = 0

    def _sample(self) -> None:
        self.peak_anonymous = max(self.peak_anonymous, anonymous_rss_bytes(self._process))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a plan is made and run, then as before.

    A plan is hundreds of thousands of small objects (blocks, tensors, pieces) and none of them
    forms a cycle; yet each collection walks the young ones, and every full one walks them all,
    so the collector took a quarter of the conversion of a 4096-rank save (1.3 s of 4.9 s of
    CPU). Reference counting still frees everything that is not in a cycle."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
