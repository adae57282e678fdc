"""Zero-copy, read-only numpy views onto files through a bounded pool of memory maps.

A view costs no anonymous memory: its pages belong to the page cache, which the kernel can drop
under pressure, so a low-memory host only pays for what is being copied right now. Bytes that are
never viewed (optimizer states) are never read. The pool keeps a bounded number of maps open,
since a large run has thousands of rank files and a process has a limited number of descriptors
(each map holds one): half of what the process may open, at least 128 and at most 4096. A
4096-rank save reads each pipeline stage's 256 files over and over, layer after layer; a pool
smaller than a stage re-maps files all the time (59,000 maps instead of 4096 there).
"""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ms2hf.errors import FormatError

MIN_OPEN = 128
MAX_OPEN = 4096


def default_max_open() -> int:
    """Half the descriptors this process may open (its soft limit), within the bounds above."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return MIN_OPEN
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN
    return max(MIN_OPEN, min(MAX_OPEN, soft // 2))


class MappedFiles:
    def __init__(self, max_open: int | None = None) -> None:
        self._max_open = default_max_open() if max_open is None else max_open
        self._maps: OrderedDict[Path, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes_viewed = 0
        """Bytes of the distinct ranges handed out as views: what a run read."""
        self._seen: set[tuple[Path, int]] = set()
        self.ranges: list[tuple[Path, int, int]] = []
        """Every (file, start, end) viewed, when ``record`` is on."""
        self.record = False

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is not None:
            self._maps.move_to_end(path)
            return m
        try:
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise FormatError(f"{path}: cannot map for reading: {e}") from e
        self._maps[path] = m
        while len(self._maps) > self._max_open:
            _, old = self._maps.popitem(last=False)
            _close(old)
        return m

    def view(self, path: Path, start: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = 1
        for d in shape:
            count *= d
        end = start + count * dtype.itemsize
        key = (path, start)
        with self._lock:
            m = self._map(path)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes_viewed += end - start
            if self.record:
                self.ranges.append((path, start, end))
        if end > len(m):
            raise FormatError(f"{path}: shrank while being read (needs {end} bytes, has {len(m)})")
        return np.frombuffer(m, dtype=dtype, count=count, offset=start).reshape(shape)

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                _close(m)
            self._maps.clear()

    def __enter__(self) -> MappedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:
        pass  # a view is still alive; the map goes when the view is collected
