"""The table and the five targets of the issue, from the measured runs."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from benchmarks.jobs import Shape
from ms2hf.pipeline.engine.budget import parse_size

SPEED_RATIO = 1.3
FLAT = 1.15
ANON_SLACK = 100_000_000
"""Anonymous memory may exceed the budget by this much (the interpreter, numpy, the plan)."""
MEMCAP_LIMIT = "512M"
MEMORY_BUDGET = "256MiB"
BUDGET_BYTES = parse_size(MEMORY_BUDGET)
SPEED_WORKLOADS = ("W", "W-dp2-opt", "M64", "W-ckpt2", "W-ckpt2-dedup", "W-lora")
SCALING = ("S8", "S14", "W")
PLANNING_SECONDS = 30.0
"""Reading and planning a 4096-rank save: "in seconds"."""
PLANNING_MEMORY_SHARE = 0.01
"""Planning memory "far below the model's size": under 1% of it."""
SCALING_CASE = "convert (scaling)"
MIB = 2**20


@dataclass(frozen=True)
class Row:
    workload: str
    case: str
    cache: str
    runs: int
    median_s: float
    min_s: float
    max_s: float
    cpu_s: float
    gb_per_s: float
    """GB of model weights read from the training output, per second: the same numerator for
    every case of a workload, so these compare as the times do."""
    s_per_gb: float
    reported_s_per_gb: float | None
    """From the time ``convert --json`` reports (its own work: planning and writing, without the
    interpreter's start-up and imports, a constant about 0.3 s that would otherwise dominate the
    smaller sizes); None for other commands."""
    peak_anon_bytes: int
    peak_cgroup_bytes: int | None
    other_load_cores: float
    stolen_cores: float
    cpu_speed: float
    """Median GB/s of the reference cast around each run, the slower of before and after
    (``machine.cpu_speed``)."""
    discarded: int
    """Runs done again because the host slowed them down (``Bench.run_case``)."""
    load_1min: float
    ratio_to_floor: float | None = None

    @classmethod
    def of(cls, result, shape: Shape) -> Row:
        seconds = [r["seconds"] for r in result.runs]
        median = statistics.median(seconds)
        gb = shape.read_bytes / 1e9
        reported = [r["reported_seconds"] for r in result.runs]
        reported = None if None in reported else statistics.median(reported)
        return cls(
            workload=result.workload,
            case=result.case,
            cache=result.cache,
            runs=len(seconds),
            median_s=median,
            min_s=min(seconds),
            max_s=max(seconds),
            cpu_s=result.median("cpu_seconds"),
            gb_per_s=gb / median,
            s_per_gb=median / gb,
            reported_s_per_gb=None if reported is None else reported / gb,
            peak_anon_bytes=result.peak("peak_anon_bytes"),
            peak_cgroup_bytes=result.peak("peak_cgroup_bytes"),
            other_load_cores=result.median("other_load_cores"),
            stolen_cores=result.median("stolen_cores"),
            cpu_speed=statistics.median(min(r["cpu_speed_gb_per_s"]) for r in result.runs),
            discarded=sum(len(r["discarded"]) for r in result.runs),
            load_1min=max(r["load_1min_at_start"] for r in result.runs),
        )


def _floor_of(row: Row) -> str:
    return "(merge+reverse)" if "merge+reverse" in row.case else ""


def _is_floor(row: Row) -> bool:
    return row.case.startswith("floor")


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """Each row's time over the best floor of the same workload, I/O shape and cache state (memory
    capped runs, which are warm, against the warm floor)."""
    out = []
    for row in rows:
        floors = [
            f.median_s
            for f in rows
            if _is_floor(f)
            and f.workload == row.workload
            and f.cache == row.cache
            and f.case.endswith(_floor_of(row))
            and (_floor_of(row) or "merge" not in f.case)
        ]
        out.append(replace(row, ratio_to_floor=row.median_s / min(floors) if floors else None))
    return out


def _find(rows: Iterable[Row], workload: str, case: str, cache: str = "warm") -> Row | None:
    return next((r for r in rows if (r.workload, r.case, r.cache) == (workload, case, cache)), None)


def _target(name: str, met: bool, detail: str) -> dict[str, object]:
    return {"target": name, "met": bool(met), "detail": detail}


def evaluate(
    rows: Sequence[Row],
    checks: Mapping[str, bool],
    memcap_note: str | None,
    cold_note: str | None,
    plans: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict[str, object]]:
    """The issue's targets for every workload measured (M64, the MoE, has the dense targets)."""
    states = ["warm"] if cold_note else ["warm", "cold"]
    targets = []
    for workload in SPEED_WORKLOADS:
        for state in states:
            row = _find(rows, workload, "convert", state)
            if row is not None and row.ratio_to_floor is not None:
                targets.append(
                    _target(
                        f"1 speed: convert {workload} {state} within {SPEED_RATIO}x of the floor",
                        row.ratio_to_floor <= SPEED_RATIO,
                        f"{row.median_s:.2f} s = {row.ratio_to_floor:.2f}x floor",
                    )
                )
    limit = BUDGET_BYTES + ANON_SLACK
    for workload, case, number in (
        ("W", "convert (memcap)", "2 memory"),
        ("W", "merge+reverse (memcap)", "5 merge+reverse memory"),
        ("M64", "convert (memcap)", "2 memory"),
        ("W-ckpt2", "convert (memcap)", "2 memory"),
        ("W-ckpt2-dedup", "convert (memcap)", "2 memory"),
        ("W-lora", "convert (memcap)", "2 memory"),
    ):
        row = _find(rows, workload, case)
        if row is None:
            if memcap_note:
                targets.append(
                    _target(
                        f"{number}: {workload} under memcap", False, f"not measured: {memcap_note}"
                    )
                )
            continue
        targets.append(
            _target(
                f"{number}: {case.split(' ')[0]} {workload} under memcap {MEMCAP_LIMIT} with "
                f"--memory-budget {MEMORY_BUDGET}, RssAnon <= budget + {ANON_SLACK / 1e6:.0f} MB",
                row.peak_anon_bytes <= limit,
                f"ran in {row.median_s:.2f} s; peak RssAnon {row.peak_anon_bytes / MIB:.0f} MiB "
                f"(limit {limit / MIB:.0f} MiB); peak cgroup {row.peak_cgroup_bytes / MIB:.0f} MiB",
            )
        )
    scaling = [r for name in SCALING if (r := _find(rows, name, SCALING_CASE)) is not None]
    if len(scaling) == len(SCALING):
        per_gb = [r.reported_s_per_gb for r in scaling]
        anon = [r.peak_anon_bytes for r in scaling]
        targets.append(
            _target(
                f"3 scaling: s/GB (as convert reports it) and peak RssAnon within {FLAT:.2f}x "
                "across three sizes",
                max(per_gb) / min(per_gb) <= FLAT and max(anon) / min(anon) <= FLAT,
                "s/GB "
                + ", ".join(f"{r.workload} {r.reported_s_per_gb:.2f}" for r in scaling)
                + f" (spread {max(per_gb) / min(per_gb):.2f}x; wall clock with start-up "
                + ", ".join(f"{r.s_per_gb:.2f}" for r in scaling)
                + "); anon MiB "
                + ", ".join(f"{a / MIB:.0f}" for a in anon)
                + f" (spread {max(anon) / min(anon):.2f}x)",
            )
        )
    one, two = _find(rows, "W", "convert --workers 1"), _find(rows, "W", "convert --workers 2")
    if one and two:
        targets.append(
            _target(
                "4 workers: --workers 1 and 2 byte-identical",
                checks.get("W: workers 1 and 2 identical", False),
                f"speed-up {one.median_s / two.median_s:.2f}x "
                f"({one.median_s:.2f} s -> {two.median_s:.2f} s)",
            )
        )
    for name, plan in (plans or {}).items():
        share = plan["peak_anon_bytes"] / plan["model_bytes"]
        targets.append(
            _target(
                f"6 planning: {name} ({plan['ranks']} ranks) read and planned within "
                f"{PLANNING_SECONDS:.0f} s, peak RssAnon under {PLANNING_MEMORY_SHARE:.0%} of the "
                "model",
                plan["wall_seconds"] <= PLANNING_SECONDS and share <= PLANNING_MEMORY_SHARE,
                f"{plan['wall_seconds']:.2f} s ({plan['seconds']:.2f} s planning, "
                f"{plan['cpu_seconds']:.2f} s cpu); peak RssAnon "
                f"{plan['peak_anon_bytes'] / MIB:.0f} MiB for {plan['model_bytes'] / 1e9:.0f} GB "
                f"of weights ({share:.3%}); "
                f"metadata.json {plan['metadata_bytes'] / 1e6:.0f} MB",
            )
        )
    for state in states:
        row = _find(rows, "W", "merge+reverse", state)
        if row is not None and row.ratio_to_floor is not None:
            targets.append(
                _target(
                    f"5 merge+reverse W {state} within {SPEED_RATIO}x of its floor",
                    row.ratio_to_floor <= SPEED_RATIO,
                    f"{row.median_s:.2f} s = {row.ratio_to_floor:.2f}x its floor",
                )
            )
    return targets


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f}"


_COLUMNS: tuple[tuple[str, int, Callable[[Row], str]], ...] = (
    ("workload", -10, lambda r: r.workload),
    ("cache", -5, lambda r: r.cache),
    ("case", -34, lambda r: r.case),
    ("median s", 8, lambda r: f"{r.median_s:.2f}"),
    ("min-max s", 11, lambda r: f"{r.min_s:.2f}-{r.max_s:.2f}"),
    ("cpu s", 6, lambda r: f"{r.cpu_s:.2f}"),
    ("GB/s", 5, lambda r: f"{r.gb_per_s:.2f}"),
    ("x floor", 7, lambda r: "-" if r.ratio_to_floor is None else f"{r.ratio_to_floor:.2f}"),
    ("anon MiB", 8, lambda r: _mib(r.peak_anon_bytes)),
    ("cgroup MiB", 10, lambda r: _mib(r.peak_cgroup_bytes)),
    ("others", 6, lambda r: f"{r.other_load_cores:.2f}"),
    ("stolen", 6, lambda r: f"{r.stolen_cores:.2f}"),
    ("cpu GB/s", 8, lambda r: f"{r.cpu_speed:.1f}"),
    ("redone", 6, lambda r: str(r.discarded)),
)
LEGEND = (
    "median of the rounds; GB/s = GB of model weights read from the training output per second; "
    "x floor = over the fastest floor of the same workload and cache state; anon = peak RssAnon "
    "of the process tree; cgroup = peak of the memcap cgroup (page cache included); others, "
    "stolen = cores used by other processes, and taken by the host, during the run; cpu GB/s = "
    "a reference cast timed around the run (lower = a slower machine at that moment); redone = "
    "runs measured again because that cast showed the host had slowed the machine"
)


def _line(cells: Iterable[str]) -> str:
    return " ".join(
        f"{cell:<{-width}s}" if width < 0 else f"{cell:>{width}s}"
        for cell, (_, width, _) in zip(cells, _COLUMNS, strict=True)
    )


def print_table(
    rows: Sequence[Row], targets: Sequence[Mapping[str, object]], checks: Mapping[str, bool]
) -> None:
    head = _line(name for name, _, _ in _COLUMNS)
    print(head)
    print("-" * len(head))
    for row in rows:
        print(_line(cell(row) for _, _, cell in _COLUMNS))
    print(LEGEND)
    print()
    for name, ok in checks.items():
        print(f"check {name}: {'yes' if ok else 'NO'}")
    for t in targets:
        print(f"[{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['detail']}")


def print_planning(plans: Mapping[str, Mapping[str, float]]) -> None:
    for name, p in plans.items():
        print(
            f"planning {name}: {p['ranks']} ranks, {p['files']} model files, {p['parameters']} "
            f"parameters in {p['blocks']} blocks, {p['model_bytes'] / 1e9:.0f} GB of weights, "
            f"metadata.json {p['metadata_bytes'] / 1e6:.0f} MB: {p['wall_seconds']:.2f} s "
            f"(source plan {p['source_plan_seconds']:.2f} s, Hugging Face plan "
            f"{p['hf_plan_seconds']:.2f} s), peak RssAnon {p['peak_anon_bytes'] / MIB:.0f} MiB"
        )
