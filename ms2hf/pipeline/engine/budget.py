"""The memory budget: how much anonymous memory the assembly buffers may hold at once.

Source bytes come through memory maps (page cache, reclaimable), so the only memory a run owns is
its band buffers: one per worker, sized so that all of them together stay within the budget, and
never larger than the CPU cache, where they are fastest (but for a LoRA merge, whose short numpy
calls want larger chunks); so the budget only ever lowers them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import psutil

from ms2hf.errors import Ms2hfError

log = logging.getLogger("ms2hf")

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

DEFAULT_FRACTION = 0.25
"""Of the memory available at start: leaves room for the page cache that feeds the copies."""
MAX_BAND_BYTES = 2 * 2**20
"""About a core's share of the CPU cache: a band is cast into, checked, checksummed and written,
and while it fits in cache only the first of those passes touches main memory. Larger bands are
slower, not faster (converting the 0.6B benchmark workload, warm: 2.5 s with 2 MiB bands, 3.0 s
with 4 MiB, 3.1 s with 64 MiB; ``benchmarks/``), and hold memory for nothing."""
MIN_BAND_BYTES = 1 * 2**20
MAX_MERGE_BYTES = 16 * 2**20
"""A worker's buffer while it makes a fine-tuned (LoRA-merged) tensor. The merge runs about a
dozen numpy calls per chunk of rows (``ms2hf.transforms.lora_merge``); in half of a 2 MiB band
buffer a chunk is 2 to 22 rows, so a run makes about a million short calls and two workers spend
their time handing the interpreter lock to each other. Converting the W-lora benchmark workload
warm with two workers (one BLAS thread): 6.7 s with 2 MiB, 3.7 s with 4 MiB, 2.8 s with 16 and
32 MiB, 2.9 s with 64 MiB."""


def parse_size(text: str) -> int:
    """``5GB`` is 5e9 bytes (decimal, as huggingface_hub counts); ``512MiB`` is 512 * 2**20."""
    m = _SIZE.match(str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size; use a number with an optional unit such as 5GB, 512MB, "
            "256MiB or 2GiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def default_workers() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


@dataclass(frozen=True)
class MemoryBudget:
    total: int
    workers: int

    @classmethod
    def resolve(cls, total: int | None, workers: int | None) -> MemoryBudget:
        """The given budget and worker count, or the defaults: ``DEFAULT_FRACTION`` of the
        available memory, one worker per CPU this process may run on. A given budget is met:
        more workers than the CPUs, or than the budget has band buffers for, are cut (with a
        note); a budget too small for a single band buffer is refused."""
        cpus = default_workers()
        if workers is not None and workers < 1:
            raise Ms2hfError(f"--workers {workers}: expected a positive number of workers")
        if workers is not None and workers > cpus:
            log.info(
                "note: --workers %d: this process may use %d CPU(s); using %d", workers, cpus, cpus
            )
        count = min(workers or cpus, cpus)
        if total is None:
            total = max(
                MIN_BAND_BYTES * count, int(psutil.virtual_memory().available * DEFAULT_FRACTION)
            )
        fits = total // MIN_BAND_BYTES
        if 0 < fits < count:
            log.info(
                "note: --memory-budget %s holds %d worker band buffer(s) of %s; using %d "
                "worker(s) instead of %d",
                format_size(total),
                fits,
                format_size(MIN_BAND_BYTES),
                fits,
                count,
            )
        return cls.fitted(total, count)

    @classmethod
    def fitted(cls, total: int, workers: int) -> MemoryBudget:
        """``workers`` band buffers in ``total``, or as many as fit; a budget too small for one
        is refused."""
        if total < MIN_BAND_BYTES:
            raise Ms2hfError(
                f"--memory-budget {format_size(total)} is less than one worker's band buffer "
                f"({format_size(MIN_BAND_BYTES)}); give at least 1MiB"
            )
        return cls(total, min(workers, total // MIN_BAND_BYTES))

    @property
    def band_bytes(self) -> int:
        """The size of each worker's reused buffer."""
        return max(MIN_BAND_BYTES, min(MAX_BAND_BYTES, self.total // self.workers))

    @property
    def merge_bytes(self) -> int:
        """The size of a worker's buffer while it merges LoRA (it replaces the band buffer, so
        the workers' buffers together still stay within the budget)."""
        return max(self.band_bytes, min(MAX_MERGE_BYTES, self.total // self.workers))
