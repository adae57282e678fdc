"""Section ``ranks`` of ``python -m benchmarks.run``: what convert costs per rank and per tensor.

Two saves of one Qwen3-MoE (96 layers x 128 experts, 157 MiB of fp32 weights, 37,731 output
tensors; issue 14): 512 ranks (TP4 x DP8 x PP16, EP8) and 4096 ranks (TP8 x DP32 x PP16, EP32),
both with optimizer sharding and redundancy removed. The bytes are the same; only the number of
rank files, headers, strategy files and blocks differs, so a difference in time is the cost of
ranks, not of bytes.

Each round runs, for each save, two fresh subprocesses on a warm page cache: ``ms2hf convert``
itself (the time a user sees, start-up included; wall and CPU seconds, as the host is shared)
and ``python -m benchmarks.ranks ROOT OUT``, which makes convert's calls one phase at a time and
prints each phase's wall and CPU seconds (rank folders and step, strategy files, headers, source
plan, model rules, shards, shard layouts, fingerprint, folder claim, execution, small files) and
the planning memory: the resident-size growth over the planning phases, and (in one more run,
``--trace``, since tracing slows everything) the Python heap's peak over them. Medians are
reported, with convert's fastest run; the phase driver's output must equal convert's.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks import jobs, measure
from benchmarks.bench import Bench
from benchmarks.workloads import Workload
from ms2hf.generator import GeneratorConfig, MoeConfig

MOE_157MIB = {
    "layers": 96,
    "hidden": 64,
    "heads": 8,
    "groups": 4,
    "head_dim": 16,
    "vocab": 2048,
    "dtype": "fp32",
    "opt_shard": -1,
    "remove_redundancy": True,
}
"""Tiny widths, many tensors: 157.1 MiB of weights in 963 parameters, 37,731 output tensors."""
PLANNING = ("list", "strategies", "metadata", "headers", "source plan", "model rules", "shards")
"""The phases before the output folder is touched: what planning memory is measured over."""
TARGET_SECONDS = 5.0
"""Issue 14: the 4096-rank save converts in under 5 s."""


def _moe(tp: int, dp: int, pp: int, ep: int, layers: int, save_format: str) -> GeneratorConfig:
    dims = {**MOE_157MIB, "layers": layers}
    return GeneratorConfig(
        **dims,  # type: ignore[arg-type]
        tp=tp,
        dp=dp,
        pp=pp,
        moe=MoeConfig(experts=128, moe_ffn=16, top_k=8, ep=ep),
        save_format=save_format,
    )


RANKS = ("R512", "R4096", "R512-ckpt2", "R4096-ckpt2")


def rank_workloads(quick: bool) -> dict[str, Workload]:
    """R512 and R4096, in the legacy format and as Checkpoint 2.0 (the same save through
    mindformers' other writer); quick: 64 and 512 ranks of a 16-layer model."""
    if quick:
        layers, shapes, what = 16, ((2, 4, 8, 4), (4, 16, 8, 16)), "quick: Qwen3-MoE 16x128"
    else:
        layers, shapes, what = 96, ((4, 8, 16, 8), (8, 32, 16, 32)), "Qwen3-MoE 96x128, fp32"
    out = {}
    for name, (tp, dp, pp, ep) in zip(("R512", "R4096"), shapes):
        cut = f"TP{tp} x DP{dp} x PP{pp}, EP{ep}, optimizer sharding, de-duplicated"
        for fmt, suffix in (("legacy", ""), ("ckpt2", "-ckpt2")):
            config = _moe(tp, dp, pp, ep, layers, fmt)
            label = f"{what}, {tp * dp * pp} ranks ({cut}), {fmt}"
            out[name + suffix] = Workload(name + suffix, config, label)
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Laps:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def __call__(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.seconds[name], self.cpu[name] = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def phases(root: Path, out: Path, trace: bool) -> dict[str, object]:
    """``convert ROOT OUT`` made of the calls ``ms2hf.commands.convert`` makes (no yaml, no
    reference config, defaults otherwise), timed one phase at a time; as convert does, with the
    cyclic garbage collector paused."""
    from ms2hf.pipeline.engine.memory import paused_gc

    with paused_gc():
        return _phases(root, out, trace)


def _phases(root: Path, out: Path, trace: bool) -> dict[str, object]:
    from ms2hf.commands.convert import ConvertOptions
    from ms2hf.io.hf_output import HF_METADATA, index_document, write_json
    from ms2hf.io.safetensors_reader import read_headers
    from ms2hf.io.safetensors_writer import layout_shard
    from ms2hf.io.sources import locate
    from ms2hf.io.sources.ckpt2 import Headers, plan_from
    from ms2hf.io.sources.ckpt2_metadata import Metadata
    from ms2hf.io.sources.iterations import choose_iteration
    from ms2hf.io.sources.legacy import build_source_plan, find_rank_dirs, select_step
    from ms2hf.io.sources.plan import LEGACY
    from ms2hf.io.sources.strategy import load_strategy
    from ms2hf.pipeline.engine.budget import MemoryBudget
    from ms2hf.pipeline.engine.checks import FiniteCheck
    from ms2hf.pipeline.engine.execute import WriteTask
    from ms2hf.pipeline.engine.fingerprint import fingerprint
    from ms2hf.pipeline.engine.output_dir import (
        HF_FOLDER,
        claim_output_dir,
        prepare_output_dir,
    )
    from ms2hf.pipeline.engine.progress import Progress
    from ms2hf.pipeline.executors.local import LocalExecutor
    from ms2hf.pipeline.plan import HfPlan, config_dtype, plan_files
    from ms2hf.transforms.hf_config import config_json
    from ms2hf.transforms.registry import hf_model

    laps = _Laps()
    rss0 = _rss()
    if trace:
        tracemalloc.start()
    laps.restart()
    options = ConvertOptions(progress=False)
    where = locate(root)
    if where.source_format == LEGACY:
        rank_dirs = find_rank_dirs(where.checkpoint_dir)
        step, paths = select_step(rank_dirs, options.step)
        laps("list")
        assert where.strategy_dir is not None
        strategy = load_strategy(where.strategy_dir)
        laps("strategies")
        ranks = sorted(paths)
        headers = read_headers(paths[r] for r in ranks)
        laps("headers")
        source = build_source_plan(step, headers, ranks, strategy)
        del headers
    else:
        folder, choice = choose_iteration(where.checkpoint_dir, options.step, None)
        laps("list")
        meta = Metadata(folder)
        laps("metadata")
        model_headers = Headers(folder, meta)
        laps("headers")
        source = plan_from(meta, model_headers, choice)
        del meta, model_headers
    laps("source plan")
    shapes = {name: p.shape for name, p in source.params.items()}
    model = hf_model(shapes, {}, config_dtype(source, options.dtype), options.routing_scale)
    laps("model rules")
    files = plan_files(
        model.outputs, source, options.dtype, options.max_shard_size, options.shard_layout
    )
    plan = HfPlan(model, files)
    laps("shards")
    planning_rss = _rss() - rss0
    planning_peak = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    laps.restart()
    prepare_output_dir(out, options.overwrite)
    layouts = {f.name: layout_shard([t.entry for t in f.tensors], HF_METADATA) for f in files}
    laps("shard layouts")
    check = FiniteCheck(options.strict)
    run_fingerprint = fingerprint(files, source.params, HF_METADATA, check)
    laps("fingerprint")
    budget = MemoryBudget.resolve(options.memory_budget, options.workers)
    config = config_json(plan.model.config)
    index = index_document(plan.weight_map, plan.nbytes, plan.parameters)
    sizes = {name: layout.size for name, layout in layouts.items()}
    with claim_output_dir(out, run_fingerprint, sizes, False) as output:
        laps("claim")
        task = WriteTask(out, files, layouts, source.params, check, budget)
        with Progress(0, "", False) as progress:
            LocalExecutor().write(task, output, progress)
        laps("execute")
        write_json(out / "config.json", config)
        output.finish(HF_FOLDER, index)
        laps("small files")
    return {
        "seconds": laps.seconds,
        "cpu_seconds": laps.cpu,
        "planning_rss_bytes": planning_rss,
        "planning_peak_bytes": planning_peak,
        "tensors": len(plan.weight_map),
        "ranks": source.ranks,
        "files": len(source.files),
    }


def _driver(root: Path, out: Path, env: dict[str, str], trace: bool = False) -> dict:
    argv = jobs.python("-m", "benchmarks.ranks", str(root), str(out), *(["--trace"] * trace))
    done = measure.run_checked(argv, f"phase driver on {root}", env=env)
    return {**json.loads(done.stdout), "wall": done.seconds}


def _convert(root: Path, out: Path, env: dict[str, str]) -> dict:
    done = measure.run_checked(jobs.convert(root, out), f"convert on {root}", env=env)
    return {
        "wall": done.seconds,
        "reported": done.reported_seconds,
        "cpu": done.cpu_seconds,
        "peak_anon_bytes": done.peak_anon_bytes,
    }


def measure_ranks(
    bench: Bench, roots: dict[str, Path], identical: Callable[[Path, Path], bool]
) -> dict[str, dict]:
    """For each save: ``bench.repeat`` rounds of the phase driver and of convert, then one
    traced driver run; each from a warm page cache and an empty output folder."""
    results: dict[str, dict] = {}
    for name, root in roots.items():
        bench.log(f"ranks: {name}")
        reads = jobs.workload_shape(root).reads
        phased, converted = bench.out / "phases", bench.out / "converted"
        drivers, converts = [], []
        for i in range(bench.repeat + 1):  # the first round settles the cache: not counted
            bench.clear()
            measure.warm(reads, "mmap")
            driver = _driver(root, phased, bench.env)
            bench.clear({phased})
            convert = _convert(root, converted, bench.env)
            if i:
                drivers.append(driver)
                converts.append(convert)
                bench.log(
                    f"  {name} round {i}: convert {convert['wall']:.2f} s wall, "
                    f"{convert['cpu']:.2f} s cpu; phases {sum(driver['seconds'].values()):.2f} s"
                )
        same = identical(phased, converted)
        bench.clear()
        traced = _driver(root, bench.out / "traced", bench.env, trace=True)
        bench.clear()
        results[name] = {
            "phases": drivers,
            "convert": converts,
            "traced": traced,
            "driver_output_identical": same,
        }
    return results


def _median(runs: Sequence[dict], key: str, phase: str) -> float:
    return statistics.median(r[key][phase] for r in runs)


def print_ranks(results: dict[str, dict]) -> None:
    for name, doc in results.items():
        runs, converts = doc["phases"], doc["convert"]
        keys = list(runs[0]["seconds"])
        print(
            f"\n{name}: {runs[0]['ranks']} ranks, {runs[0]['tensors']} output tensors "
            f"(phases: median of {len(runs)}, wall and cpu seconds)"
        )
        for key in keys:
            wall, cpu = _median(runs, "seconds", key), _median(runs, "cpu_seconds", key)
            print(f"  {key:14s} {wall:7.3f} {cpu:7.3f}")
        for label, subset in (("planning", PLANNING), ("in process", keys)):
            wall = sum(_median(runs, "seconds", k) for k in subset if k in keys)
            cpu = sum(_median(runs, "cpu_seconds", k) for k in subset if k in keys)
            print(f"  = {label:12s} {wall:7.3f} {cpu:7.3f}")
        walls = [c["wall"] for c in converts]
        cpus = [c["cpu"] for c in converts]
        print(
            f"  convert (CLI): wall min {min(walls):.2f} median {statistics.median(walls):.2f} s;"
            f" cpu min {min(cpus):.2f} median {statistics.median(cpus):.2f} s; peak anon "
            f"{max(c['peak_anon_bytes'] for c in converts) / 2**20:.0f} MiB"
        )
        rss = statistics.median(r["planning_rss_bytes"] for r in runs)
        peak = doc["traced"]["planning_peak_bytes"]
        print(
            f"  planning memory: RSS +{rss / 2**20:.0f} MiB, Python heap peak "
            f"{peak / 2**20:.0f} MiB (tracemalloc)"
        )
        print(f"  phase driver's output identical to convert's: {doc['driver_output_identical']}")


def evaluate_ranks(results: dict[str, dict]) -> list[dict[str, object]]:
    doc = results.get("R4096")
    if doc is None:
        return []
    walls = [c["wall"] for c in doc["convert"]]
    cpus = [c["cpu"] for c in doc["convert"]]
    return [
        {
            "target": f"ranks: convert R4096 in under {TARGET_SECONDS:g} s",
            "met": min(walls) < TARGET_SECONDS and doc["driver_output_identical"],
            "detail": f"wall min {min(walls):.2f} s, median {statistics.median(walls):.2f} s; "
            f"cpu min {min(cpus):.2f} s, median {statistics.median(cpus):.2f} s",
        }
    ]


def main(argv: Sequence[str]) -> int:
    """``python -m benchmarks.ranks ROOT OUT [--trace]``: the phase driver."""
    args = [a for a in argv if a != "--trace"]
    root, out = (Path(a) for a in args)
    print(json.dumps(phases(root, out, "--trace" in argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
