"""What the figures came from: the machine, and how busy it was with other work during each run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

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


def busy_jiffies() -> tuple[int, int]:
    """(non-idle, total) CPU time of the whole machine so far, in clock ticks."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def other_load(before: tuple[int, int], after: tuple[int, int], own_cpu: float, seconds: float) -> float:
    """Cores' worth of CPU that other processes used while a run was measured: the machine's
    busy time minus the run's own, over the run's wall time."""
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) / ticks
    return max(0.0, (busy - own_cpu) / seconds) if seconds > 0 else 0.0
