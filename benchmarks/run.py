"""``python -m benchmarks.run``: every figure of the README's performance section, in one run.

Workloads are generated once by ``ms2hf.generator`` and cached (``--cache``). Each case runs as
its own subprocess, so its time and peak memory are its own; cases are interleaved repetition by
repetition, so drift and other load fall on all of them alike, and the median is reported. Before
every run the page cache is put in the same state for all cases: *warm* reads the model
parameters' bytes once beforehand, *cold* drops the page cache (root only; skipped, and said, when
not permitted). Everything dirty is written back before each run (``sync``), outside the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import jobs, measure
from benchmarks.floor import MODES as FLOOR_MODES
from benchmarks.machine import busy_jiffies, describe, other_load
from benchmarks.report import Row, evaluate, print_table, with_ratios
from benchmarks.workloads import Workload, ensure, full_workloads, quick_workloads
from ms2hf.io.unified_format import unified_dir

HERE = Path(__file__).resolve().parent
MEMCAP_LIMIT = "512M"
MEMORY_BUDGET = "256MiB"
SECTIONS = ("speed", "dp", "scaling", "workers", "memory")


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
    """Removed before each run (and after the last one), outside the timing."""


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


def bytecode_env(prefix: Path) -> dict[str, str]:
    """The environment of every measured command: compiled bytecode cached (under ``prefix``,
    outside the source tree) as a normal installation has it, even where the caller's
    environment turns bytecode writing off, so that no run pays for compiling ms2hf."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    return env


class Bench:
    def __init__(self, cache: Path, repeat: int, log: Callable[[str], None]) -> None:
        self.cache = cache
        self.scratch = cache / "scratch"
        self.repeat = repeat
        self.log = log
        self.results: dict[tuple[str, str, str], Result] = {}
        self.cold_note = measure.drop_caches()
        self.memcap_note = measure.memcap_available()
        self.env = bytecode_env(cache / "pycache")
        subprocess.run(jobs.python("-c", "import ms2hf.cli, benchmarks.floor"), env=self.env, check=True)

    def states(self) -> list[str]:
        return ["warm"] if self.cold_note else ["warm", "cold"]

    def _prepare(self, cache_state: str, ranges: Sequence[jobs.Range]) -> None:
        measure.sync()
        if cache_state == "cold":
            measure.drop_caches()
        else:
            measure.warm(ranges)

    def run_case(self, case: Case, cache_state: str, ranges: Sequence[jobs.Range]) -> dict:
        jobs.clear(*case.outputs)
        self._prepare(cache_state, ranges)
        before, load_start = busy_jiffies(), os.getloadavg()[0]
        runs = [measure.run(step.argv, step.memcap, self.env) for step in case.steps]
        after = busy_jiffies()
        failed = next((r for r in runs if r.returncode != 0), None)
        if failed is not None:
            raise RuntimeError(f"{case.workload} {case.name}: exit {failed.returncode}\n{failed.stderr}")
        seconds = sum(r.seconds for r in runs)
        cpu = sum(r.cpu_seconds for r in runs)
        cgroup = [r.peak_cgroup_bytes for r in runs if r.peak_cgroup_bytes is not None]
        record = {
            "seconds": seconds,
            "step_seconds": [r.seconds for r in runs],
            "cpu_seconds": cpu,
            "peak_anon_bytes": max(r.peak_anon_bytes for r in runs),
            "peak_cgroup_bytes": max(cgroup) if cgroup else None,
            "load_1min_at_start": load_start,
            "other_load_cores": other_load(before, after, cpu, seconds),
        }
        key = (case.workload, case.name, cache_state)
        self.results.setdefault(key, Result(*key)).runs.append(record)
        self.log(
            f"  {case.workload:10s} {cache_state:4s} {case.name:28s} {seconds:7.2f} s  "
            f"cpu {cpu:6.2f} s  anon {record['peak_anon_bytes'] / 2**20:6.0f} MiB  "
            f"other load {record['other_load_cores']:.2f}"
        )
        return record

    def rounds(self, cases: Sequence[Case], ranges: Sequence[jobs.Range], states: Sequence[str], keep_last: bool = False) -> None:
        """``repeat`` rounds; in each, every cache state and every case once, in turn."""
        for _ in range(self.repeat):
            for state in states:
                for case in cases:
                    self.run_case(case, state, ranges)
        if not keep_last:
            for case in cases:
                jobs.clear(*case.outputs)


def floor_cases(name: str, plans: dict[str, dict], scratch: Path) -> list[Case]:
    """The convert floor and the merge+reverse floor, in each scheduling mode."""
    files = {}
    for key, plan in plans.items():
        files[key] = scratch / f"floor-{name}-{key}.json"
        files[key].parent.mkdir(parents=True, exist_ok=True)
        files[key].write_text(json.dumps(plan))
    outs = (scratch / "floor-out", scratch / "floor-mid")
    cases = []
    for mode in FLOOR_MODES:
        cases.append(Case(name, f"floor {mode}", (Step(jobs.floor(files["convert"], mode)),), outs))
        cases.append(
            Case(
                name,
                f"floor {mode} (merge+reverse)",
                (Step(jobs.floor(files["merge"], mode)), Step(jobs.floor(files["reverse"], mode))),
                outs,
            )
        )
    return cases


def convert_case(name: str, root: Path, out: Path, label: str = "convert", *extra: str, memcap: str | None = None) -> Case:
    return Case(name, label, (Step(jobs.convert(root, out, *extra), memcap),), (out,))


def merge_reverse_case(workload: Workload, root: Path, scratch: Path, *extra: str, memcap: str | None = None) -> Case:
    mid, out = scratch / "merged", scratch / "reversed"
    unified = unified_dir(mid, workload.config.file_suffix)
    return Case(
        workload.name,
        "merge+reverse" + (" (memcap)" if memcap else ""),
        (Step(jobs.merge(root, mid, *extra), memcap), Step(jobs.reverse(unified, out, *extra), memcap)),
        (mid, out),
    )


def speed(bench: Bench, workload: Workload, root: Path, shape: jobs.Shape, merge_reverse: bool) -> None:
    """Floors, convert and (for W) merge+reverse, warm and cold."""
    name = workload.name
    bench.log(f"speed: {name}, floor vs convert" + (" vs merge+reverse" if merge_reverse else ""))
    floors = floor_cases(name, jobs.floor_plans(shape, bench.scratch), bench.scratch)
    cases = [c for c in floors if merge_reverse or "merge" not in c.name]
    cases.append(convert_case(name, root, bench.scratch / "converted"))
    if merge_reverse:
        cases.append(merge_reverse_case(workload, root, bench.scratch))
    bench.rounds(cases, shape.reads, bench.states())


def scaling(bench: Bench, roots: dict[str, Path], shapes: dict[str, jobs.Shape]) -> None:
    """Convert at the two smaller sizes (W, the largest, is measured by ``speed``)."""
    bench.log("scaling: convert at three sizes")
    for name in ("S8", "S14"):
        bench.rounds([convert_case(name, roots[name], bench.scratch / "converted")], shapes[name].reads, ["warm"])


def workers(bench: Bench, root: Path, shape: jobs.Shape) -> dict[str, bool]:
    """``--workers 1`` vs ``--workers 2``: the speed-up, and that the bytes are the same."""
    bench.log("workers: --workers 1 vs 2")
    one, two = bench.scratch / "workers-1", bench.scratch / "workers-2"
    cases = [
        convert_case("W", root, one, "convert --workers 1", "--workers", "1"),
        convert_case("W", root, two, "convert --workers 2", "--workers", "2"),
    ]
    bench.rounds(cases, shape.reads, ["warm"], keep_last=True)
    return {"workers_identical": files_identical(one, two)}


def memory_runs(bench: Bench, workload: Workload, root: Path, shape: jobs.Shape) -> tuple[dict[str, str] | None, dict[str, bool]]:
    """Convert and merge+reverse under ``memcap`` with a budget smaller than the embedding; their
    outputs must equal the uncapped ones (kept by ``workers``)."""
    if bench.memcap_note:
        bench.log(f"note: memory runs skipped: memcap unavailable: {bench.memcap_note}")
        return None, {}
    bench.log(f"memory: under memcap {MEMCAP_LIMIT} with --memory-budget {MEMORY_BUDGET}")
    budget = ("--memory-budget", MEMORY_BUDGET)
    capped = bench.scratch / "capped"
    cases = [
        convert_case("W", root, capped, "convert (memcap)", *budget, memcap=MEMCAP_LIMIT),
        merge_reverse_case(workload, root, bench.scratch, *budget, memcap=MEMCAP_LIMIT),
    ]
    bench.rounds(cases, shape.reads, ["warm"], keep_last=True)
    reference = bench.scratch / "workers-2"
    checks = {
        "memcap_convert_identical": files_identical(capped, reference),
        "reverse_identical_to_convert": files_identical(bench.scratch / "reversed", reference),
    }
    return {"limit": MEMCAP_LIMIT, "budget": MEMORY_BUDGET}, checks


def files_identical(a: Path, b: Path, chunk: int = 64 * 2**20) -> bool:
    """Every ``*.safetensors`` and index file of ``a`` equals ``b``'s, byte for byte."""
    names = sorted(p.name for p in a.iterdir() if p.name.endswith((".safetensors", ".json")) and not p.name.startswith("."))
    if names != sorted(p.name for p in b.iterdir() if p.name.endswith((".safetensors", ".json")) and not p.name.startswith(".")):
        return False
    for name in names:
        with open(a / name, "rb") as fa, open(b / name, "rb") as fb:
            while True:
                x, y = fa.read(chunk), fb.read(chunk)
                if x != y:
                    return False
                if not x:
                    break
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="workloads and scratch outputs (default: benchmarks/.cache)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported (default: 3)")
    parser.add_argument("--quick", action="store_true", help="small workloads, one run each: a smoke check of the harness")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "latest.json", help="where to write the results")
    parser.add_argument(
        "--sections", metavar="LIST",
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all); memory needs workers' output",
    )
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    workloads = quick_workloads() if args.quick else full_workloads()
    started = time.perf_counter()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cache = args.cache.resolve()
    roots = {name: ensure(w, cache, log) for name, w in workloads.items()}
    shapes = {name: jobs.workload_shape(root) for name, root in roots.items()}
    bench = Bench(cache, repeat, log)
    if bench.cold_note:
        log(f"note: cold runs skipped: {bench.cold_note}")
    log(f"load average at start: {os.getloadavg()}")

    sections = set(args.sections.split(",")) if args.sections else set(SECTIONS)
    checks: dict[str, bool] = {}
    memory = None
    if "speed" in sections:
        speed(bench, workloads["W"], roots["W"], shapes["W"], merge_reverse=True)
    if "dp" in sections:
        speed(bench, workloads["W-dp2-opt"], roots["W-dp2-opt"], shapes["W-dp2-opt"], merge_reverse=False)
    if "scaling" in sections:
        scaling(bench, roots, shapes)
    if "workers" in sections or "memory" in sections:
        checks.update(workers(bench, roots["W"], shapes["W"]))
    if "memory" in sections:
        memory, found = memory_runs(bench, workloads["W"], roots["W"], shapes["W"])
        checks.update(found)
    jobs.clear(bench.scratch)

    rows = with_ratios([Row.of(r, shapes[r.workload]) for r in bench.results.values()])
    targets = evaluate(rows, checks, memory, bench.cold_note)
    print_table(rows, targets, checks)
    doc = {
        "command": "python -m benchmarks.run" + (" --quick" if args.quick else f" --repeat {repeat}"),
        "machine": describe(cache),
        "notes": [n for n in (bench.cold_note, bench.memcap_note) if n],
        "workloads": {
            name: {
                "description": workload.description,
                "generator_config": asdict(workload.config),
                "model_bytes_read": shapes[name].read_bytes,
                "hf_bytes_written": shapes[name].hf_bytes,
                "unified_bytes_written": shapes[name].unified_bytes,
            }
            for name, workload in workloads.items()
        },
        "rows": [asdict(r) for r in rows],
        "runs": [asdict(r) for r in bench.results.values()],
        "checks": checks,
        "targets": targets,
        "benchmark_seconds": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    log(f"wrote {args.json} ({time.perf_counter() - started:.0f} s)")
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
