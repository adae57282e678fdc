"""``convert``: a MindSpore Transformers training output -> a Hugging Face checkpoint, in one pass.

Plan first, from headers and strategies alone (source blocks, Hugging Face tensors, shards);
then stream: every output band is copied and cast from memory-mapped rank files into a reused
buffer and written at its place, under the memory budget. Nothing but the model's slices is read.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ms2hf.errors import OutputError
from ms2hf.io.dtypes import itemsize
from ms2hf.io.hf_output import HF_INDEX, index_document, write_json
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.train_yaml import read_train_config
from ms2hf.pipeline.budget import MemoryBudget, format_size
from ms2hf.pipeline.execute import PlannedFile, PlannedTensor, write_files
from ms2hf.pipeline.output_dir import prepare_output_dir
from ms2hf.pipeline.progress import Progress
from ms2hf.pipeline.shards import hf_shard_names, pack
from ms2hf.pipeline.source_plan import SourcePlan, plan_source
from ms2hf.transforms.casts import output_dtype
from ms2hf.transforms.hf_config import config_json
from ms2hf.transforms.models import HfModel, hf_model

log = logging.getLogger("ms2hf")

HF_METADATA = {"format": "pt"}


@dataclass
class ConvertOptions:
    dtype: str = "bf16"
    max_shard_size: int = 5_000_000_000
    memory_budget: int | None = None
    """Bytes of buffers the run may hold; None for a fraction of the available memory."""
    workers: int | None = None
    step: str | None = None
    config: Path | None = None
    """A training yaml: layout flags, sizes to check, config values the weights cannot tell."""
    given: dict[str, tuple[Any, str]] = field(default_factory=dict)
    """Values from flags, ``{hf name: (value, flag)}``: checked against the shapes."""
    overwrite: bool = False
    progress: bool = True


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

    def summary(self) -> str:
        rate = self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else float("inf")
        return (
            f"wrote {self.tensors} tensors ({format_size(self.bytes_written)}) in "
            f"{len(self.files)} file(s) to {self.output_dir} in {self.seconds:.1f} s "
            f"({rate:.2f} GB/s); read {format_size(self.bytes_read)} of model weights"
        )


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def gather_given(options: ConvertOptions) -> dict[str, tuple[Any, str]]:
    """Yaml values, then flags on top (a flag names itself in messages)."""
    given = dict(read_train_config(options.config)) if options.config else {}
    given.update(options.given)
    return given


def plan_hf_files(model: HfModel, source: SourcePlan, dtype: str, max_shard_size: int) -> list[PlannedFile]:
    planned = [
        PlannedTensor(t, output_dtype(source.params[t.source].dtype, dtype)) for t in model.outputs
    ]
    groups = pack(planned, [p.entry.nbytes for p in planned], max_shard_size)
    return [PlannedFile(name, tuple(g)) for name, g in zip(hf_shard_names(len(groups)), groups)]


def write_hf_checkpoint(
    source: SourcePlan, out_dir: Path, options: ConvertOptions, given: dict[str, tuple[Any, str]]
) -> ConvertReport:
    """The shared back half of ``convert`` and ``reverse``: model rules, shards, index, config."""
    started = time.perf_counter()
    shapes = {name: p.shape for name, p in source.params.items()}
    dtype_tag = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}.get(options.dtype)
    if dtype_tag is None:
        dtypes = {p.dtype for p in source.params.values()}
        dtype_tag = dtypes.pop() if len(dtypes) == 1 else "F32"
    model = hf_model(shapes, given, dtype_tag)
    files = plan_hf_files(model, source, options.dtype, options.max_shard_size)
    prepare_output_dir(out_dir, options.overwrite)
    workers = options.workers or default_workers()
    budget = MemoryBudget.resolve(options.memory_budget, workers)
    total = sum(f.nbytes for f in files)
    log.info(
        "%s: %d tensors, %s in %d file(s); budget %s, %d worker(s)",
        model.model_type, len(model.outputs), format_size(total), len(files),
        format_size(budget.total), budget.workers,
    )
    for name, value in sorted(model.config.items()):
        log.debug("config %s = %r (%s)", name, value.value, value.origin)
    with MappedFiles() as mapped, Progress(total, "convert", options.progress) as progress:
        write_files(out_dir, files, source.params, HF_METADATA, budget, progress, mapped)
        bytes_read = mapped.bytes_viewed
    write_json(out_dir / "config.json", config_json(model.config))
    weight_map = {t.tensor.name: f.name for f in files for t in f.tensors}
    n_params = sum(t.entry.nbytes // itemsize(t.dtype) for f in files for t in f.tensors)
    write_json(out_dir / HF_INDEX, index_document(weight_map, total, n_params))
    return ConvertReport(
        output_dir=out_dir,
        model_type=model.model_type,
        files=[f.name for f in files],
        tensors=len(weight_map),
        bytes_written=total,
        bytes_read=bytes_read,
        seconds=time.perf_counter() - started,
        config_origins={k: v.origin for k, v in model.config.items()},
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
    report = write_hf_checkpoint(source, Path(out_dir), options, given)
    report.seconds = time.perf_counter() - started
    return report
