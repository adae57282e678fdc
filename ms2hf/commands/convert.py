"""``convert``: a MindSpore Transformers training output -> a Hugging Face checkpoint, in one pass.

Plan first, from headers and strategies alone (source blocks, Hugging Face tensors, shards);
then stream: every output band is copied and cast from memory-mapped rank files into a reused
buffer and written at its place, under the memory budget. Nothing but the model's slices is read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ms2hf.errors import FormatError, ModelError, OutputError
from ms2hf.io.config_files import ConfigValue, Given
from ms2hf.io.dtypes import itemsize
from ms2hf.io.hf_output import HF_INDEX, HF_METADATA, copy_file, index_document, write_json
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.sources.legacy import plan_source
from ms2hf.io.sources.plan import SourcePlan
from ms2hf.io.tokenizer_files import find_tokenizer_files
from ms2hf.pipeline.engine.budget import MemoryBudget, format_size
from ms2hf.pipeline.engine.checks import FiniteCheck, check_replicas
from ms2hf.pipeline.engine.execute import PlannedFile, PlannedTensor, SmallFile, write_files
from ms2hf.pipeline.engine.memory import MemorySampler, peak_rss_bytes
from ms2hf.pipeline.engine.output_dir import prepare_output_dir
from ms2hf.pipeline.engine.progress import Progress
from ms2hf.pipeline.given import given_values, origin_lines
from ms2hf.pipeline.jsonable import jsonable
from ms2hf.pipeline.shards import assign_shards
from ms2hf.transforms.casts import TARGETS, output_dtype
from ms2hf.transforms.hf_config import config_json
from ms2hf.transforms.registry import HfModel, hf_model

log = logging.getLogger("ms2hf")


@dataclass
class ConvertOptions:
    dtype: str = "bf16"
    max_shard_size: int = 5_000_000_000
    shard_layout: str = "size"
    """``size`` (huggingface_hub's packing) or ``per-layer`` (the old reverse tool's files)."""
    memory_budget: int | None = None
    """Bytes of buffers the run may hold; None for a fraction of the available memory."""
    workers: int | None = None
    step: str | None = None
    config: Path | None = None
    """A training yaml: layout flags, sizes to check, config values the weights cannot tell."""
    reference_config: Path | None = None
    """A Hugging Face config.json: config values the weights cannot tell; its sizes are checked."""
    tokenizer_dir: Path | None = None
    """A folder whose tokenizer and generation files are copied into the output."""
    given: Mapping[str, ConfigValue] = field(default_factory=dict)
    """Values from flags, under config.json names (origin: the flag): checked against the shapes."""
    overwrite: bool = False
    progress: bool = True
    strict: bool = False
    """Non-finite weights are an error instead of a warning."""
    check_replicas: bool = False
    """Read every replica of every block and require it to match the copy converted."""
    record_reads: bool = False
    """Keep every byte range the conversion reads in the report, to prove what was read."""


@dataclass
class ConvertReport:
    output_dir: Path
    model_type: str
    files: list[str]
    tensors: int
    bytes_written: int
    bytes_read: int
    seconds: float
    config_origins: dict[str, str]
    tokenizer_files: list[str] = field(default_factory=list)
    peak_rss_bytes: int = 0
    """The process's largest resident size, page cache of the mapped inputs included."""
    peak_anonymous_bytes: int = 0
    """The largest anonymous resident size sampled while writing: what the run itself held."""
    read_ranges: list[tuple[Path, int, int]] = field(default_factory=list)
    """Distinct ``(file, start, end)`` ranges read, when ``record_reads`` was on."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"wrote {self.tensors} tensors ({format_size(self.bytes_written)}) in "
            f"{len(self.files)} file(s) to {self.output_dir} in {self.seconds:.1f} s "
            f"({self.gb_per_s:.2f} GB/s); read {format_size(self.bytes_read)} of model weights; "
            f"peak memory {format_size(self.peak_anonymous_bytes)} anonymous"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**jsonable(self), "gb_per_s": self.gb_per_s}


def gather_given(options: ConvertOptions) -> Given:
    """Reference config and yaml values, then flags on top (a flag names itself in messages)."""
    return given_values(options.reference_config, options.config, options.given)


def plan_hf_files(model: HfModel, source: SourcePlan, options: ConvertOptions) -> list[PlannedFile]:
    planned = [
        PlannedTensor(t, output_dtype(source.params[t.source].dtype, options.dtype))
        for t in model.outputs
    ]
    names = [p.tensor.name for p in planned]
    sizes = [p.entry.nbytes for p in planned]
    shards = assign_shards(planned, names, sizes, options.max_shard_size, options.shard_layout)
    return [PlannedFile(name, tuple(g)) for name, g in shards]


def plan_hf_checkpoint(
    source: SourcePlan, options: ConvertOptions, given: Given
) -> tuple[HfModel, list[PlannedFile]]:
    """The model, its config and the files a run would write, from shapes alone."""
    shapes = {name: p.shape for name, p in source.params.items()}
    dtype_tag = TARGETS.get(options.dtype)
    if dtype_tag is None:
        dtypes = {p.dtype for p in source.params.values()}
        dtype_tag = dtypes.pop() if len(dtypes) == 1 else "F32"
    model = hf_model(shapes, given, dtype_tag)
    return model, plan_hf_files(model, source, options)


def write_hf_checkpoint(
    source: SourcePlan, out_dir: Path, options: ConvertOptions, given: Given
) -> ConvertReport:
    """The shared back half of ``convert`` and ``reverse``: model rules, shards, index, config."""
    started = time.perf_counter()
    model, files = plan_hf_checkpoint(source, options, given)
    tokenizer = find_tokenizer_files(options.tokenizer_dir) if options.tokenizer_dir else []
    prepare_output_dir(out_dir, options.overwrite)
    budget = MemoryBudget.resolve(options.memory_budget, options.workers)
    total = sum(f.nbytes for f in files)
    log.info(
        "%s: %d tensors, %s in %d file(s); budget %s, %d worker(s)",
        model.model_type, len(model.outputs), format_size(total), len(files),
        format_size(budget.total), budget.workers,
    )
    log.info("config.json values, by where they came from:")
    for line in origin_lines(model.config):
        log.info("%s", line)
    weight_map = {t.tensor.name: f.name for f in files for t in f.tensors}
    n_params = sum(t.entry.nbytes // itemsize(t.dtype) for f in files for t in f.tensors)
    config = config_json(model.config)
    index = index_document(weight_map, total, n_params)
    then = [
        *(SmallFile(path.name, partial(copy_file, path)) for path in tokenizer),
        SmallFile("config.json", lambda path: write_json(path, config)),
        SmallFile(HF_INDEX, lambda path: write_json(path, index)),
    ]
    with MemorySampler() as memory, MappedFiles() as mapped, Progress(
        total, "convert", options.progress
    ) as progress:
        mapped.record = options.record_reads
        write_files(
            out_dir, files, source.params, HF_METADATA, budget, progress, mapped,
            FiniteCheck(options.strict), then=then, overwrite=options.overwrite,
        )
        bytes_read = mapped.bytes_viewed
        read_ranges = sorted(set(mapped.ranges))
    copied = [path.name for path in tokenizer]
    return ConvertReport(
        output_dir=out_dir,
        model_type=model.model_type,
        files=[f.name for f in files],
        tensors=len(weight_map),
        bytes_written=total,
        bytes_read=bytes_read,
        seconds=time.perf_counter() - started,
        config_origins={k: v.origin for k, v in model.config.items()},
        tokenizer_files=copied,
        peak_rss_bytes=peak_rss_bytes(),
        peak_anonymous_bytes=memory.peak_anonymous,
        read_ranges=read_ranges,
    )


def convert(
    training_output: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    strategy_dir: str | os.PathLike[str] | None = None,
) -> ConvertReport:
    """Convert ``training_output`` (holding ``checkpoint/`` and ``strategy/``) into ``out_dir``."""
    options = options or ConvertOptions()
    started = time.perf_counter()
    if checkpoint_dir is None or strategy_dir is None:
        if training_output is None:
            raise OutputError("give a training output folder, or both --checkpoint-dir and --strategy-dir")
        root = Path(training_output)
        if not root.is_dir():
            raise FormatError(
                f"{root}: training output folder does not exist (expected a folder holding "
                "checkpoint/ and strategy/)"
            )
        checkpoint_dir = checkpoint_dir or root / "checkpoint"
        strategy_dir = strategy_dir or root / "strategy"
    given = gather_given(options)
    source = plan_source(checkpoint_dir, strategy_dir, options.step)
    log.info(
        "step %s: %d ranks, %d stage(s), %d parameters (%s of weights; %s of optimizer state "
        "not read)",
        source.step, len(source.files), source.num_stages, len(source.params),
        format_size(source.param_bytes), format_size(source.optimizer_bytes),
    )
    if options.check_replicas:
        with MappedFiles() as mapped:
            check_replicas(source, mapped)
    try:
        report = write_hf_checkpoint(source, Path(out_dir), options, given)
    except ModelError as e:
        raise ModelError(f"{checkpoint_dir}, step {source.step}: {e}") from e
    report.seconds = time.perf_counter() - started
    return report
