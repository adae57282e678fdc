"""Running cases in rounds, each run from the same starting state, and keeping what was measured.

Every run starts alike: no output of an earlier run on disk (outputs are deleted before each
run, not after, except those kept for a byte comparison), nothing dirty, the page cache emptied
and then holding the programs' own code (Python, numpy, ms2hf: loaded as by any earlier
invocation) and, for *warm* runs, the checkpoint's model bytes, read the way the measured program
reads them (``measure.warm``). Cases are interleaved round by round, so drift and other load fall
on all of them alike, and the median of the rounds is what is reported.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import jobs, measure
from benchmarks.machine import cpu_speed, cpu_ticks, other_load, reclaim_scans

SLOWED = 0.8
ATTEMPTS = 3
WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class Step:
    argv: list[str]
    memcap: str | None = None


@dataclass(frozen=True)
class Case:
    """One thing timed: one or more commands run back to back (merge, then reverse)."""

    workload: str
    name: str
    steps: tuple[Step, ...]
    outputs: tuple[Path, ...]
    """What the commands write; kept after the last round when asked (``Bench.rounds``)."""
    reads_by: str = "mmap"
    """How the commands read their input (``measure.WARM_BY``): how *warm* warms it."""


@dataclass
class Result:
    workload: str
    case: str
    cache: str
    runs: list[dict] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    def peak(self, key: str) -> int | None:
        values = [r[key] for r in self.runs if r[key] is not None]
        return max(values) if values else None


def _total(values: Sequence[float | None]) -> float | None:
    return None if None in values else sum(values)


def bytecode_env(prefix: Path) -> dict[str, str]:
    """The environment of every measured command: compiled bytecode cached (under ``prefix``,
    outside the source tree) as a normal installation has it, even where the caller's
    environment turns bytecode writing off, so that no run pays for compiling ms2hf."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    return env


class Bench:
    def __init__(
        self, cache: Path, repeat: int, log: Callable[[str], None], quick: bool = False
    ) -> None:
        self.out = cache / "scratch" / "out"
        """Every case writes below here."""
        self.plans = cache / "scratch" / "plans"
        self.repeat = repeat
        self.log = log
        self.results: dict[tuple[str, str, str], Result] = {}
        self.kept: set[Path] = set()
        self.fastest = 0.0
        """The best reference-cast speed seen so far: the machine at its usual speed."""
        self.attempts, self.wait_seconds = (1, 0.0) if quick else (ATTEMPTS, WAIT_SECONDS)
        """A quick run checks the harness, not the figures: no run is done again, no waiting
        for a busy host to calm down."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.plans.mkdir(parents=True, exist_ok=True)
        self.cold_note = measure.drop_caches()
        self.memcap_note = measure.memcap_available()
        self.env = bytecode_env(cache / "pycache")
        self._load_programs()

    def states(self) -> list[str]:
        return ["warm"] if self.cold_note else ["warm", "cold"]

    def _load_programs(self) -> None:
        """Import everything the measured programs import (compiling the bytecode the first
        time), so that their code is in the page cache."""
        subprocess.run(
            jobs.python("-c", "import ms2hf.cli, benchmarks.floor"), env=self.env, check=True
        )

    def clear(self, keep: set[Path] | None = None) -> None:
        """Delete every output but ``keep`` (default: the kept ones)."""
        keep = self.kept if keep is None else keep
        for path in self.out.iterdir():
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def release(self, *paths: Path) -> None:
        """Outputs no longer needed for a comparison: deleted now."""
        self.kept.difference_update(paths)
        self.clear()

    def _prepare(self, case: Case, cache_state: str, ranges: Sequence[jobs.Range]) -> None:
        self.clear()
        measure.drop_caches()  # also where not permitted: it writes back what is dirty
        self._load_programs()
        if cache_state == "warm":
            measure.warm(ranges, case.reads_by)

    def run_case(self, case: Case, cache_state: str, ranges: Sequence[jobs.Range]) -> None:
        """Measure ``case`` once. A run starts when the machine is at its usual speed (the
        reference cast at least ``SLOWED`` of the best seen, or after ``WAIT_SECONDS``); a run
        the host slowed down (the cast just after it below that) is done again, at most
        ``ATTEMPTS`` times in all, and kept in the record as discarded."""
        discarded: list[dict] = []
        for attempt in range(1, self.attempts + 1):
            self._prepare(case, cache_state, ranges)
            record = self._measure(case)
            self.fastest = max(self.fastest, *record["cpu_speed_gb_per_s"])
            slowed = min(record["cpu_speed_gb_per_s"]) < SLOWED * self.fastest
            if not slowed or attempt == self.attempts:
                break
            discarded.append(record)
            self.log(f"  (host slowed during the run: {record['seconds']:.2f} s discarded)")
        record["discarded"] = discarded
        key = (case.workload, case.name, cache_state)
        self.results.setdefault(key, Result(*key)).runs.append(record)
        self.log(
            f"  {case.workload:10s} {cache_state:4s} {case.name:34s} {record['seconds']:6.2f} s  "
            f"cpu {record['cpu_seconds']:6.2f} s  anon {record['peak_anon_bytes'] / 2**20:4.0f} MiB"
            f"  others {record['other_load_cores']:.2f}  stolen {record['stolen_cores']:.2f}"
        )

    def _at_speed(self) -> float:
        """The reference-cast speed once the machine runs at its usual speed again, waiting up
        to ``WAIT_SECONDS`` for it (a busy host comes and goes within seconds)."""
        waited = 0.0
        while (speed := cpu_speed()) < SLOWED * self.fastest and waited < self.wait_seconds:
            time.sleep(0.5)
            waited += 0.5
        return speed

    def _measure(self, case: Case) -> dict:
        speed_before = self._at_speed()
        before, scans_before, load = cpu_ticks(), reclaim_scans(), os.getloadavg()[0]
        runs = [measure.run(step.argv, step.memcap, self.env) for step in case.steps]
        after, scans = cpu_ticks(), reclaim_scans() - scans_before
        speed_after = cpu_speed()
        failed = next((r for r in runs if r.returncode != 0), None)
        if failed is not None:
            raise RuntimeError(
                f"{case.workload} {case.name}: exit {failed.returncode}\n{failed.stderr}"
            )
        seconds = sum(r.seconds for r in runs)
        cpu = sum(r.cpu_seconds for r in runs)
        cgroup = [r.peak_cgroup_bytes for r in runs if r.peak_cgroup_bytes is not None]
        others, stolen = other_load(before, after, cpu, seconds)
        return {
            "seconds": seconds,
            "step_seconds": [r.seconds for r in runs],
            "cpu_seconds": cpu,
            "peak_anon_bytes": max(r.peak_anon_bytes for r in runs),
            "peak_cgroup_bytes": max(cgroup) if cgroup else None,
            "load_1min_at_start": load,
            "other_load_cores": others,
            "stolen_cores": stolen,
            "reclaim_scanned_pages": scans,
            "cpu_speed_gb_per_s": [speed_before, speed_after],
            "reported_seconds": _total([r.reported_seconds for r in runs]),
        }

    def rounds(
        self,
        cases: Sequence[Case],
        ranges: Sequence[jobs.Range],
        states: Sequence[str],
        keep: bool = False,
    ) -> None:
        """``repeat`` rounds; in each, every cache state and every case once, in turn. With
        ``keep``, the last round's outputs stay until ``release``d."""
        for i in range(self.repeat):
            for state in states:
                for case in cases:
                    self.run_case(case, state, ranges)
                    if keep and i == self.repeat - 1 and state == states[-1]:
                        self.kept.update(case.outputs)
        self.clear()
