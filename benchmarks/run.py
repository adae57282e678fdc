"""``python -m benchmarks.run``: every figure of the README's performance section, in one run.

Workloads are generated once by ``ms2hf.generator`` and cached (``--cache``). Each case runs as
its own subprocess, so its time and peak memory are its own; how runs are made comparable (same
page-cache state, interleaved rounds, medians) is ``benchmarks.bench``'s. Cold runs need root to
drop the page cache; without it they are skipped, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks import jobs, measure
from benchmarks.bench import Bench, Case, Step
from benchmarks.floor import MODES as FLOOR_MODES
from benchmarks.machine import describe
from benchmarks.ranks import RANKS, evaluate_ranks, measure_ranks, print_ranks, rank_workloads
from benchmarks.ray_overhead import measure_ray
from benchmarks.report import (
    MEMCAP_LIMIT,
    MEMORY_BUDGET,
    SCALING,
    SCALING_CASE,
    Row,
    evaluate,
    print_planning,
    print_table,
    with_ratios,
)
from benchmarks.workloads import (
    Workload,
    ensure,
    full_workloads,
    planning_workloads,
    quick_workloads,
)
from ms2hf.io.unified_format import unified_dir

HERE = Path(__file__).resolve().parent
NEEDS: dict[str, tuple[str, ...]] = {
    "speed": ("W",),
    "dp": ("W-dp2-opt",),
    "scaling": SCALING,
    "workers": ("W",),
    "memory": ("W",),
    "moe": ("M64",),
    "ckpt2": ("W-ckpt2", "W-ckpt2-dedup"),
    "plan": ("P4096", "P4096-dedup"),
    "lora": ("W-lora",),
    "ranks": RANKS,
    "ray": ("W",),
}
"""Each section -> the workloads it measures: only those are generated and planned."""
SECTIONS = tuple(NEEDS)
PLANNED_ONLY = frozenset(NEEDS["plan"])
"""Workloads only planned, never converted (sparse files): no I/O shape, no floor."""


def floor_cases(name: str, shape: jobs.Shape, bench: Bench) -> list[Case]:
    """The convert floor in each scheduling mode, and the merge+reverse floor."""
    files = {}
    for key, plan in jobs.floor_plans(shape, bench.out).items():
        files[key] = bench.plans / f"floor-{name}-{key}.json"
        files[key].write_text(json.dumps(plan))
    cases = [
        Case(name, f"floor {mode}", (Step(jobs.floor(files["convert"], mode)),), (), "read")
        for mode in FLOOR_MODES
    ]
    mode = "overlapped"  # the faster mode for two passes; one mode keeps the run short
    steps = (Step(jobs.floor(files["merge"], mode)), Step(jobs.floor(files["reverse"], mode)))
    cases.append(Case(name, f"floor {mode} (merge+reverse)", steps, (), "read"))
    return cases


def convert_case(
    name: str, root: Path, out: Path, label: str = "convert", *extra: str, memcap: str | None = None
) -> Case:
    return Case(name, label, (Step(jobs.convert(root, out, *extra), memcap),), (out,))


def merge_reverse_case(
    workload: Workload, root: Path, bench: Bench, *extra: str, memcap: str | None = None
) -> Case:
    mid, out = bench.out / "merged", bench.out / "reversed"
    unified = unified_dir(mid, workload.config.file_suffix)
    steps = (
        Step(jobs.merge(root, mid, *extra), memcap),
        Step(jobs.reverse(unified, out, *extra), memcap),
    )
    return Case(workload.name, "merge+reverse" + (" (memcap)" if memcap else ""), steps, (mid, out))


def speed(
    bench: Bench,
    workload: Workload,
    root: Path,
    shape: jobs.Shape,
    merge_reverse: bool,
    keep: bool = False,
) -> None:
    """Floors, convert and (for W) merge+reverse, warm and cold. With ``keep``, convert's output
    stays as the reference of ``memory_runs``."""
    name = workload.name
    bench.log(f"speed: {name}, floor vs convert" + (" vs merge+reverse" if merge_reverse else ""))
    cases = [c for c in floor_cases(name, shape, bench) if merge_reverse or "merge" not in c.name]
    cases.append(convert_case(name, root, bench.out / "converted"))
    if merge_reverse:
        cases.append(merge_reverse_case(workload, root, bench))
    bench.rounds(cases, shape.reads, bench.states(), keep=keep)


def scaling(bench: Bench, roots: dict[str, Path], shapes: dict[str, jobs.Shape]) -> None:
    """Convert at three sizes, interleaved in the same rounds so that all see the same machine;
    each run starts with its own workload's weights in the page cache."""
    bench.log("scaling: convert at three sizes")
    for _ in range(bench.repeat):
        for name in SCALING:
            case = convert_case(name, roots[name], bench.out / "converted", SCALING_CASE)
            bench.run_case(case, "warm", shapes[name].reads)
    bench.clear()


def workers(bench: Bench, root: Path, shape: jobs.Shape) -> dict[str, bool]:
    """``--workers 1`` vs ``--workers 2``: the speed-up, and that the bytes are the same. The
    ``--workers 2`` output stays as the reference for ``memory_runs``."""
    bench.log("workers: --workers 1 vs 2")
    one, two = bench.out / "workers-1", bench.out / "workers-2"
    cases = [
        convert_case("W", root, one, "convert --workers 1", "--workers", "1"),
        convert_case("W", root, two, "convert --workers 2", "--workers", "2"),
    ]
    bench.rounds(cases, shape.reads, ["warm"], keep=True)
    same = files_identical(one, two)
    bench.release(one)
    return {"W: workers 1 and 2 identical": same}


def memory_runs(
    bench: Bench,
    workload: Workload,
    root: Path,
    shape: jobs.Shape,
    reference: Path,
    merge_reverse: bool,
) -> dict[str, bool]:
    """Convert (and merge+reverse) under ``memcap`` with a budget smaller than the largest
    tensors; their outputs must equal the uncapped convert's ``reference`` output."""
    if bench.memcap_note:
        bench.log(f"note: memory runs skipped: memcap unavailable: {bench.memcap_note}")
        bench.release(reference)  # the next section writes its own
        return {}
    name = workload.name
    bench.log(f"memory: {name} under memcap {MEMCAP_LIMIT} with --memory-budget {MEMORY_BUDGET}")
    budget = ("--memory-budget", MEMORY_BUDGET)
    capped = bench.out / "capped"
    cases = [convert_case(name, root, capped, "convert (memcap)", *budget, memcap=MEMCAP_LIMIT)]
    if merge_reverse:
        cases.append(merge_reverse_case(workload, root, bench, *budget, memcap=MEMCAP_LIMIT))
    bench.rounds(cases, shape.reads, ["warm"], keep=True)
    checks = {f"{name}: memcap convert identical": files_identical(capped, reference)}
    if merge_reverse:
        reversed_ = bench.out / "reversed"
        checks[f"{name}: reverse identical to convert"] = files_identical(reversed_, reference)
    bench.release(*bench.kept)
    return checks


def planning(bench: Bench, roots: dict[str, Path]) -> dict[str, dict]:
    """Read and plan each save (``benchmarks.plan``), ``repeat`` times with its metadata and
    headers in the page cache (the first, unmeasured run puts them there); the median run's
    figures, and the largest peak memory."""
    results: dict[str, dict] = {}
    for name, root in roots.items():
        bench.log(f"planning: {name}")
        measure.run(jobs.plan(root), None, bench.env)
        runs = []
        for _ in range(bench.repeat):
            m = measure.run_checked(jobs.plan(root), f"{name} planning", env=bench.env)
            runs.append(
                {
                    **json.loads(m.stdout),
                    "wall_seconds": m.seconds,
                    "peak_anon_bytes": m.peak_anon_bytes,
                }
            )
            bench.log(
                f"  {name:12s} {m.seconds:6.2f} s (planning {runs[-1]['seconds']:.2f} s, cpu "
                f"{runs[-1]['cpu_seconds']:.2f} s)  anon {m.peak_anon_bytes / 2**20:5.0f} MiB"
            )
        runs.sort(key=lambda r: r["seconds"])
        median = runs[len(runs) // 2]
        results[name] = {
            **median,
            "peak_anon_bytes": max(r["peak_anon_bytes"] for r in runs),
            "runs": runs,
        }
    return results


def _compared(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name.endswith((".safetensors", ".json")) and not p.name.startswith(".")
    )


def files_identical(a: Path, b: Path, chunk: int = 64 * 2**20) -> bool:
    """Every ``*.safetensors`` and ``.json`` file of ``a`` equals ``b``'s, byte for byte."""
    names = _compared(a)
    if not names or names != _compared(b):
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
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=HERE / ".cache",
        help="workloads and scratch outputs (default: benchmarks/.cache)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per case; the median is reported (default: 3)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small workloads, one run each: a smoke check of the harness",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default: benchmarks/results/latest.json, or quick.json)",
    )
    parser.add_argument(
        "--sections",
        metavar="LIST",
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all); "
        "memory needs workers' output",
    )
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    out_json = args.json or HERE / "results" / ("quick.json" if args.quick else "latest.json")
    sections = set(args.sections.split(",")) if args.sections else set(SECTIONS)
    if unknown := sections - set(SECTIONS):
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}")
    needed = {name for section in sections for name in NEEDS[section]}
    every = {
        **(quick_workloads() if args.quick else full_workloads()),
        **planning_workloads(args.quick),
        **rank_workloads(args.quick),
    }
    workloads = {name: w for name, w in every.items() if name in needed}
    started = time.perf_counter()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # The quick stand-ins have the full workloads' names: apart, so neither evicts the other.
    cache = args.cache.resolve() / ("quick" if args.quick else "")
    roots = {name: ensure(w, cache, log) for name, w in workloads.items()}
    shapes = {
        name: jobs.workload_shape(root)
        for name, root in roots.items()
        if name not in PLANNED_ONLY and name not in NEEDS["ranks"]  # ranks: benchmarks.ranks
    }
    bench = Bench(cache, repeat, log, quick=args.quick)
    if args.quick:
        log("quick: small workloads, one run each; a smoke check of the harness, not figures")
    if bench.cold_note:
        log(f"note: cold runs skipped: {bench.cold_note}")
    log(f"load average at start: {os.getloadavg()}")

    checks: dict[str, bool] = {}
    if "speed" in sections:
        speed(bench, workloads["W"], roots["W"], shapes["W"], merge_reverse=True)
    if "dp" in sections:
        speed(
            bench,
            workloads["W-dp2-opt"],
            roots["W-dp2-opt"],
            shapes["W-dp2-opt"],
            merge_reverse=False,
        )
    if "scaling" in sections:
        scaling(bench, roots, shapes)
    if "workers" in sections or "memory" in sections:
        checks.update(workers(bench, roots["W"], shapes["W"]))
    if "memory" in sections:
        w = "W"
        reference = bench.out / "workers-2"
        checks.update(
            memory_runs(bench, workloads[w], roots[w], shapes[w], reference, merge_reverse=True)
        )
    for section in ("moe", "ckpt2", "lora"):  # each workload: speed, then memory against it
        if section in sections:
            for name in NEEDS[section]:
                workload, root, shape = workloads[name], roots[name], shapes[name]
                speed(bench, workload, root, shape, merge_reverse=False, keep=True)
                reference = bench.out / "converted"
                checks.update(
                    memory_runs(bench, workload, root, shape, reference, merge_reverse=False)
                )
    plans = {}
    if "plan" in sections:
        plans = planning(bench, {name: roots[name] for name in NEEDS["plan"]})
    if "ray" in sections:
        checks.update(measure_ray(bench, roots["W"], shapes["W"], files_identical))
    ranks = {}
    if "ranks" in sections:
        ranks = measure_ranks(bench, {n: roots[n] for n in NEEDS["ranks"]}, files_identical)
    bench.release(*bench.kept)

    rows = with_ratios([Row.of(r, shapes[r.workload]) for r in bench.results.values()])
    targets = evaluate(rows, checks, bench.memcap_note, bench.cold_note, plans)
    targets += evaluate_ranks(ranks)
    print_table(rows, targets, checks)
    print_planning(plans)
    print_ranks(ranks)
    doc = {
        "command": "python -m benchmarks.run"
        + (" --quick" if args.quick else f" --repeat {repeat}"),
        "machine": describe(cache),
        "notes": [n for n in (bench.cold_note, bench.memcap_note) if n],
        "workloads": {
            name: {
                "description": workload.description,
                "generator_config": asdict(workload.config),
                **(
                    {
                        "model_bytes_read": shapes[name].read_bytes,
                        "hf_bytes_written": shapes[name].hf_bytes,
                        "unified_bytes_written": shapes[name].unified_bytes,
                    }
                    if name in shapes
                    else {}
                ),
            }
            for name, workload in workloads.items()
        },
        "planning": plans,
        "ranks": ranks,
        "rows": [asdict(r) for r in rows],
        "runs": [asdict(r) for r in bench.results.values()],
        "checks": checks,
        "targets": targets,
        "benchmark_seconds": time.perf_counter() - started,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    log(f"wrote {out_json} ({time.perf_counter() - started:.0f} s)")
    if args.quick:  # small stand-ins, one run each: the figures judge nothing, the checks do
        passed = all(checks.values())
        log(
            "quick: the targets are not judged on the small stand-ins; the checks "
            + ("passed" if passed else "FAILED")
        )
        return 0 if passed else 1
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
