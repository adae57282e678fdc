"""What each benchmarked case runs, and the I/O its floor must match, planned with ms2hf's own
planning code (headers and strategies only, nothing is read or converted here)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks.floor import floor_plan
from ms2hf.commands.convert import ConvertOptions, lora_request, plan_for
from ms2hf.commands.merge import PART_SIZE, plan_unified_files
from ms2hf.io.dtypes import nbytes
from ms2hf.io.hf_output import HF_METADATA
from ms2hf.io.safetensors_writer import layout_shard
from ms2hf.io.sources import plan_training_output
from ms2hf.io.sources.plan import SourceParam
from ms2hf.io.unified_format import METADATA as UNIFIED_METADATA

Range = tuple[str, int, int]


@dataclass(frozen=True)
class Shape:
    """The I/O of converting one workload: the parameter bytes read, the files written."""

    reads: tuple[Range, ...]
    hf_sizes: tuple[int, ...]
    """Shard files ``convert`` (and ``reverse``) write."""
    unified_sizes: tuple[int, ...]
    """Part files (and ``hyper_param``) ``merge`` writes."""
    scalar_reads: tuple[Range, ...]

    @property
    def read_bytes(self) -> int:
        return sum(n for _, _, n in self.reads)

    @property
    def hf_bytes(self) -> int:
        return sum(self.hf_sizes)

    @property
    def unified_bytes(self) -> int:
        return sum(self.unified_sizes)


def _ranges(params: Mapping[str, SourceParam]) -> list[Range]:
    """Every block ``convert`` reads: one copy of each, as the source plan schedules them."""
    return sorted(
        (str(b.path), b.start, nbytes(p.dtype, b.shape)) for p in params.values() for b in p.blocks
    )


def workload_shape(root: Path) -> Shape:
    source = plan_training_output(root)
    options = ConvertOptions()
    files = plan_for(source, options, {}, lora_request(options, root)).files
    hf = tuple(layout_shard([t.entry for t in f.tensors], HF_METADATA).size for f in files)
    parts, _ = plan_unified_files(source.params, source.scalars, PART_SIZE)
    unified = tuple(
        layout_shard([t.entry for t in f.tensors], UNIFIED_METADATA).size for f in parts
    )
    return Shape(
        reads=tuple(_ranges(source.params)),
        hf_sizes=hf,
        unified_sizes=unified,
        scalar_reads=tuple(_ranges(source.scalars)),
    )


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def convert(root: Path, out: Path, *extra: str) -> list[str]:
    return python("-m", "ms2hf.cli", "convert", str(root), str(out), "-q", "--json", *extra)


def merge(root: Path, out: Path, *extra: str) -> list[str]:
    return python(
        "-m",
        "ms2hf.cli",
        "merge",
        "--mindspore_ckpt_dir",
        str(root),
        "--output_dir",
        str(out),
        "-q",
        *extra,
    )


def plan(root: Path) -> list[str]:
    return python("-m", "benchmarks.plan", str(root))


def reverse(unified: Path, out: Path, *extra: str) -> list[str]:
    return python(
        "-m",
        "ms2hf.cli",
        "reverse",
        "--input_path",
        str(unified),
        "--output_path",
        str(out),
        "-q",
        *extra,
    )


def floor(plan_file: Path, mode: str) -> list[str]:
    return python("-m", "benchmarks.floor", str(plan_file), mode)


def floor_plans(shape: Shape, scratch: Path) -> dict[str, dict]:
    """The floors: ``convert`` (parameters in, shards out) and ``merge+reverse`` as its two
    passes (parameters in, parts out; then the parts in, shards out). The second pass reads
    the files the first one wrote, so it has the same page-cache state as ``reverse``."""
    first = floor_plan(
        list(shape.reads + shape.scalar_reads), list(shape.unified_sizes), scratch / "floor-mid"
    )
    second = floor_plan(
        [(path, 0, n) for path, n in first["writes"]], list(shape.hf_sizes), scratch / "floor-out"
    )
    return {
        "convert": floor_plan(list(shape.reads), list(shape.hf_sizes), scratch / "floor-out"),
        "merge": first,
        "reverse": second,
    }
