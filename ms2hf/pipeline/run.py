"""Running a plan: what every command that writes a checkpoint folder does the same way.

``convert``, ``reverse`` and ``merge`` differ in what they plan; once planned, each checks
replicas if asked, sizes its memory budget and workers, maps the source files, shows progress,
hands the plan to the engine and measures what the run read and held. That scaffolding is here,
once, with the options that govern it (``RunOptions``, which each command's options extend).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from ms2hf.errors import Ms2hfError
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.sources.plan import SourceParam, SourcePlan
from ms2hf.pipeline.engine.budget import MemoryBudget, format_size
from ms2hf.pipeline.engine.checks import FiniteCheck, check_replicas
from ms2hf.pipeline.engine.execute import Index, SmallFile, write_files
from ms2hf.pipeline.engine.memory import MemorySampler, peak_rss_bytes
from ms2hf.pipeline.engine.output_dir import HF_FOLDER, FolderKind, prepare_output_dir
from ms2hf.pipeline.engine.progress import Progress
from ms2hf.pipeline.plan import PlannedFile

log = logging.getLogger("ms2hf")


@dataclass(frozen=True)
class RunOptions:
    """How to run, whatever is written."""

    memory_budget: int | None = None
    """Bytes of buffers the run may hold; None for a fraction of the available memory."""
    workers: int | None = None
    """Threads assembling and writing tensors; None for one per CPU this process may use."""
    overwrite: bool = False
    """Write into a folder holding other files, replacing only the files this run writes."""
    progress: bool = True
    strict: bool = False
    """Non-finite weights are an error instead of a warning."""
    check_replicas: bool = False
    """Read every replica of every block and require it to match the copy used."""
    record_reads: bool = False
    """Keep every byte range the run reads, to prove what was read (tests)."""

    def __post_init__(self) -> None:
        """Options come from scripts as much as from the command line: a wrong type or value is
        a clear ``Ms2hfError`` naming the option here, not a failure deep in a run."""
        for name in ("memory_budget", "workers"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise option_error(name, value, "a positive whole number, or None for the default")
        for name in ("overwrite", "progress", "strict", "check_replicas", "record_reads"):
            if not isinstance(getattr(self, name), bool):
                raise option_error(name, getattr(self, name), "True or False")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def option_error(name: str, value: object, expected: str) -> Ms2hfError:
    return Ms2hfError(f"option {name}={value!r}: expected {expected}")


def check_positive(options: object, *names: str) -> None:
    """Each of ``names`` is a positive whole number (sizes in bytes, counts)."""
    for name in names:
        value = getattr(options, name)
        if not _positive_int(value):
            raise option_error(name, value, "a positive whole number")


def as_path(options: object, *names: str) -> None:
    """Each of ``names`` (of a frozen options object) as a ``Path``: scripts pass strings."""
    for name in names:
        value = getattr(options, name)
        if isinstance(value, (str, os.PathLike)) and not isinstance(value, Path):
            object.__setattr__(options, name, Path(value))
        elif value is not None and not isinstance(value, Path):
            raise option_error(name, value, "a path, or None")


@dataclass(frozen=True)
class RunStats:
    """What a run read, held and took."""

    bytes_read: int
    seconds: float
    peak_rss_bytes: int
    """The process's largest resident size, page cache of the mapped inputs included."""
    peak_anonymous_bytes: int
    """The largest anonymous resident size sampled while writing: what the run itself held."""
    read_ranges: list[tuple[Path, int, int]] = field(default_factory=list)
    """Distinct ``(file, start, end)`` ranges read, when ``record_reads`` was on."""


def run_plan(
    source: SourcePlan,
    out_dir: Path,
    files: Sequence[PlannedFile],
    params: Mapping[str, SourceParam],
    metadata: Mapping[str, str],
    then: Sequence[SmallFile],
    index: Index,
    options: RunOptions,
    label: str,
    kind: FolderKind = HF_FOLDER,
    inputs: Sequence[Path] = (),
) -> RunStats:
    """Check the replicas if asked, then write ``files`` (reading ``params``), the small files
    ``then`` and the index into ``out_dir``; nothing is created before the checks pass.
    ``inputs`` are the files besides the source's that the run reads: never removed."""
    started = time.perf_counter()
    if options.check_replicas:
        with MappedFiles() as mapped:
            check_replicas(source, mapped)
    prepare_output_dir(out_dir, options.overwrite, kind)
    budget = MemoryBudget.resolve(options.memory_budget, options.workers)
    total = sum(f.nbytes for f in files)
    log.info(
        "%s: %s in %d file(s); budget %s, %d worker(s)",
        label,
        format_size(total),
        len(files),
        format_size(budget.total),
        budget.workers,
    )
    with (
        MemorySampler() as memory,
        MappedFiles() as mapped,
        Progress(total, label, options.progress) as progress,
    ):
        mapped.record = options.record_reads
        write_files(
            out_dir,
            files,
            params,
            metadata,
            budget,
            progress,
            mapped,
            FiniteCheck(options.strict),
            then=then,
            index=index,
            overwrite=options.overwrite,
            kind=kind,
            inputs=[*inputs, *(f.path for f in source.files)],
        )
    for f in files:
        log.debug("  %s: %d tensors, %s", f.name, len(f.tensors), format_size(f.nbytes))
    log.debug(
        "%s: read %s from %d source file(s); peak %s anonymous",
        label,
        format_size(mapped.bytes_viewed),
        len(source.files),
        format_size(memory.peak_anonymous),
    )
    return RunStats(
        bytes_read=mapped.bytes_viewed,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        peak_anonymous_bytes=memory.peak_anonymous,
        read_ranges=sorted(set(mapped.ranges)),
    )


def jsonable(value: Any) -> Any:
    """``value`` with dataclasses as dicts, paths as strings and tuples as lists: what
    ``--json`` prints and reports' ``to_dict()`` return."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return value
