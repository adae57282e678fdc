"""What the figures came from: the machine, and how busy it was with other work during each run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(
            ["df", "--output=source,fstype", str(path)], capture_output=True, text=True, check=True
        ).stdout.split("\n")[1]
        return " ".join(out.split())
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def describe(cache: Path) -> dict[str, object]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_memory_bytes() / 2**30, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "filesystem": _filesystem(cache),
    }


def cpu_ticks() -> tuple[int, int]:
    """(busy, stolen) CPU time of the whole machine so far, in clock ticks. Stolen time is
    what the hypervisor gave other guests while this one wanted to run."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal


def other_load(
    before: tuple[int, int], after: tuple[int, int], own_cpu: float, seconds: float
) -> tuple[float, float]:
    """Cores' worth of CPU that other processes used while a run was measured (the machine's busy
    time minus the run's own, over the run's wall time), and cores' worth stolen by the host."""
    if seconds <= 0:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) / ticks
    stolen = (after[1] - before[1]) / ticks
    return max(0.0, (busy - own_cpu) / seconds), stolen / seconds


def reclaim_scans() -> int:
    """Pages the kernel has scanned to reclaim memory so far (kswapd and direct): when a run
    raises this, it ran short of free memory and paid for it."""
    total = 0
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name.startswith("pgscan_"):
            total += int(value)
    return total


def cpu_speed(seconds: float = 0.05) -> float:
    """GB/s of a reference copy-and-cast (fp32 -> bf16, in cache) for about ``seconds``: the
    speed of this (virtual) machine's cores right now. Noisy neighbours on the host slow every
    run without showing as load or stolen time here; this shows it."""
    src = np.ones(1 << 18, np.float32)
    dst = np.empty(src.shape, ml_dtypes.bfloat16)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        np.copyto(dst, src, casting="unsafe")
        done += src.nbytes
    return done / elapsed / 1e9
