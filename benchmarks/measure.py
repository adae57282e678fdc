"""Running one command as a measured subprocess: wall time, CPU time, peak anonymous memory of its
process tree, and, under ``memcap``, the peak memory of its cgroup.

Anonymous memory is sampled from ``/proc/PID/status`` (``RssAnon``) of the command and all its
descendants every ``SAMPLE_SECONDS``; mapped file pages (``RssFile``) are left out because they are
page cache the kernel can drop, which is what a memory-capped host cares about. The sampler is a
thread of the harness, not of the measured process, so it costs the command nothing but a few
small file reads per sample.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

SAMPLE_SECONDS = 0.01
MEMCAP_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "tools" / "memcap"
"""Where the project's machines keep ``memcap``: ``../shared/tools/memcap`` from the repository."""


def find_memcap() -> Path:
    """``memcap`` beside the repository, else on the PATH (else the expected place, to name)."""
    if MEMCAP_BESIDE.exists():
        return MEMCAP_BESIDE
    found = shutil.which("memcap")
    return Path(found) if found else MEMCAP_BESIDE


MEMCAP = find_memcap()
_MEMCAP_LINE = re.compile(r"memcap: peak=(\d+) limit=(\d+) oom=(\d) rc=(-?\d+)")


@dataclass(frozen=True)
class Measured:
    seconds: float
    cpu_seconds: float
    """User + system time of the process tree (from ``wait4``, children included)."""
    peak_anon_bytes: int
    """Largest sampled sum of ``RssAnon`` over the process tree."""
    peak_cgroup_bytes: int | None
    """Peak memory of the ``memcap`` cgroup (page cache included); None when not capped."""
    returncode: int
    stdout: str
    stderr: str

    @property
    def reported_seconds(self) -> float | None:
        """The time the command reports itself (``ms2hf convert --json``): its own work, without
        the interpreter's start-up and imports; None when it prints no such report."""
        try:
            doc = json.loads(self.stdout)
        except ValueError:
            return None
        return doc.get("seconds") if isinstance(doc, dict) else None


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return found


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


class _Sampler:
    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_rss_anon(p) for p in _tree(self._pid)))
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def memcap_available() -> str | None:
    """None when ``memcap`` can cap a command here, else why not."""
    if not MEMCAP.exists():
        return f"{MEMCAP} not found"
    probe = subprocess.run(
        [str(MEMCAP), "64M", "--", "true"], capture_output=True, text=True, check=False
    )
    return None if probe.returncode == 0 else (probe.stderr.strip() or f"exit {probe.returncode}")


def run(
    command: Sequence[str], memcap: str | None = None, env: Mapping[str, str] | None = None
) -> Measured:
    """Run ``command`` (under ``memcap LIMIT`` when given) and measure it; never raises on a
    failing command: the caller decides what a non-zero status means."""
    argv = [str(MEMCAP), memcap, "--", *command] if memcap else list(command)
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    sampler = _Sampler(process.pid)
    output: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda n=name, f=f: output.__setitem__(n, f.read()), daemon=True)
        for name, f in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    peak_anon = sampler.stop()
    for reader in readers:
        reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = output["stderr"]
    peak_cgroup = None
    if memcap:
        match = _MEMCAP_LINE.search(stderr)
        peak_cgroup = int(match.group(1)) if match else None
    return Measured(
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_anon_bytes=peak_anon,
        peak_cgroup_bytes=peak_cgroup,
        returncode=process.returncode,
        stdout=output["stdout"],
        stderr=stderr,
    )


def run_checked(
    command: Sequence[str],
    what: str,
    memcap: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Measured:
    """``run``, raising if the command failed: ``what`` names it in the error, with its stderr."""
    done = run(command, memcap, env)
    if done.returncode != 0:
        raise RuntimeError(f"{what}: exit {done.returncode}\n{done.stderr}")
    return done


def sync() -> None:
    """Write back everything dirty, so no earlier run's writes land inside the next one."""
    os.sync()


def drop_caches() -> str | None:
    """Empty the page cache (needs root); None on success, else why it could not."""
    sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"cannot drop the page cache: {e.strerror or e}"
    return None


WARM_BY = ("read", "mmap")


def warm(ranges: Sequence[tuple[str, int, int]], by: str) -> None:
    """Bring ``(path, start, nbytes)`` ranges into the page cache the way a program that reads
    them ``by`` ``read`` calls or through a memory map would: it matters. Readahead for a map
    caches the file in 2 MiB folios, for ``read`` calls mostly in smaller ones, and a program
    that maps its input runs up to 1.5x slower over the smaller ones (a plain reader does not
    notice); warm is the cache as the program's own previous run left it."""
    if by not in WARM_BY:
        raise ValueError(f"warm by {by!r}: expected one of {', '.join(WARM_BY)}")
    by_file: dict[str, list[tuple[int, int]]] = {}
    for path, start, nbytes in sorted(ranges):
        by_file.setdefault(path, []).append((start, nbytes))
    for path, spans in by_file.items():
        with open(path, "rb", buffering=0) as f:
            if by == "mmap":
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    for start, nbytes in spans:
                        _touch(m, start, nbytes)
            else:
                for start, nbytes in spans:
                    _read(f, start, nbytes)


def _touch(m: mmap.mmap, start: int, nbytes: int) -> None:
    """Fault in every page of the range (one byte each)."""
    first = start - start % mmap.PAGESIZE
    pages = np.frombuffer(m, np.uint8, count=start + nbytes - first, offset=first)
    int(pages[:: mmap.PAGESIZE].sum())
    del pages


def _read(f: BinaryIO, start: int, nbytes: int, chunk: int = 16 * 2**20) -> None:
    buffer = memoryview(bytearray(chunk))
    f.seek(start)
    while nbytes > 0:
        n = f.readinto(buffer[: min(chunk, nbytes)])
        if not n:
            break
        nbytes -= n
