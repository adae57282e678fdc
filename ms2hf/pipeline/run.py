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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from ms2hf.errors import Ms2hfError, OutputError
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.safetensors_writer import ShardLayout, layout_shard
from ms2hf.io.sources.plan import SourceParam, SourcePlan
from ms2hf.pipeline.engine.budget import MemoryBudget, format_size
from ms2hf.pipeline.engine.checks import FiniteCheck, check_replicas
from ms2hf.pipeline.engine.execute import BandCheck, WriteTask
from ms2hf.pipeline.engine.fingerprint import fingerprint
from ms2hf.pipeline.engine.memory import MemorySampler, peak_rss_bytes
from ms2hf.pipeline.engine.output_dir import (
    HF_FOLDER,
    FolderKind,
    claim_output_dir,
    prepare_output_dir,
)
from ms2hf.pipeline.engine.progress import Progress
from ms2hf.pipeline.executors import Executor, Reads
from ms2hf.pipeline.executors.local import LocalExecutor
from ms2hf.pipeline.parts import Part
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
    ray: str | None = None
    """Write on the Ray cluster at this address (``auto``: ``RAY_ADDRESS`` or the cluster
    running here), whose hosts share the output folder (``ms2hf.pipeline.executors.ray``);
    ``memory_budget`` and ``workers`` are then each task's."""
    part: Part | None = None
    """Write only this part of the files (``ms2hf.pipeline.parts``), beside the other parts."""

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
        part: object = self.part
        if isinstance(part, str):
            object.__setattr__(self, "part", Part.parse(part))
        elif part is not None and not isinstance(part, Part):
            raise option_error("part", part, "a Part, 'I/N', or None")
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray.strip()):
            raise option_error("ray", self.ray, "a Ray address, 'auto', or None")
        if self.ray is not None and self.part is not None:
            raise option_error(
                "part", self.part, "None with ray: a Ray run spreads every file over the cluster"
            )


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
class SmallFile:
    """A file written whole once every shard is in place (config, index): ``write(path)``
    must write it atomically (``ms2hf.io.hf_output``)."""

    name: str
    write: Callable[[Path], None]


Index = Mapping[str, Any]
"""The document a run writes last under its folder kind's index name (``model.safetensors.
index.json``, ``param_name_map.json``): its presence means the set is complete."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by the user after it claimed its folder: the message says what is kept."""


@dataclass(frozen=True)
class RunStats:
    """What a run read, wrote, held and took."""

    bytes_read: int
    seconds: float
    peak_rss_bytes: int
    """The process's largest resident size, page cache of the mapped inputs included."""
    peak_anonymous_bytes: int
    """The largest anonymous resident size sampled while writing: what the run itself held."""
    files: list[str] = field(default_factory=list)
    """The files this run is responsible for: all of the plan's, or its part's."""
    tensors: int = 0
    bytes_written: int = 0
    read_ranges: list[tuple[Path, int, int]] = field(default_factory=list)
    """Distinct ``(file, start, end)`` ranges read, when ``record_reads`` was on."""


def executor_for(options: RunOptions) -> Executor:
    """The local executor, or the Ray executor (Ray imported only then)."""
    if options.ray is None:
        return LocalExecutor(options.record_reads)
    from ms2hf.pipeline.executors.ray import RayExecutor

    return RayExecutor(options.ray)


def run_budget(options: RunOptions) -> MemoryBudget:
    """Buffers and threads: this host's, or each Ray task's."""
    if options.ray is None:
        return MemoryBudget.resolve(options.memory_budget, options.workers)
    from ms2hf.pipeline.executors.ray import task_budget

    return task_budget(options.memory_budget, options.workers)


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
    ``inputs`` are the files besides the source's that the run reads: never removed. With
    ``options.part``, only that part's files are written, and neither ``then`` nor the index."""
    started = time.perf_counter()
    if options.check_replicas:
        with MappedFiles() as mapped:
            check_replicas(source, mapped)
    prepare_output_dir(out_dir, options.overwrite, kind)
    executor = executor_for(options)
    budget = run_budget(options)
    mine = options.part.files(files) if options.part else list(files)
    total = sum(f.nbytes for f in mine)
    where = f"part {options.part}: " if options.part else ""
    how = f"on Ray at {options.ray}, per task: " if options.ray else ""
    log.info(
        "%s: %s%s in %d file(s); %sbudget %s, %d worker(s)",
        label,
        where,
        format_size(total),
        len(mine),
        how,
        format_size(budget.total),
        budget.workers,
    )
    with (
        executor.session(budget),
        MemorySampler() as memory,
        Progress(total, label, options.progress) as progress,
    ):
        run = _Writing(out_dir, files, mine, params, metadata, options, kind, executor, budget)
        reads = run.write(then, index, inputs, progress)
    for f in mine:
        log.debug("  %s: %d tensors, %s", f.name, len(f.tensors), format_size(f.nbytes))
    log.debug(
        "%s: read %s from %d source file(s); peak %s anonymous",
        label,
        format_size(reads.bytes_read),
        len(source.files),
        format_size(memory.peak_anonymous),
    )
    if options.part:
        log.info(
            "part %s written; once every part is, the same command without --part checks "
            "them and finishes (%s)",
            options.part,
            ", ".join([*(s.name for s in then), kind.index]),
        )
    return RunStats(
        bytes_read=reads.bytes_read,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        peak_anonymous_bytes=memory.peak_anonymous,
        files=[f.name for f in mine],
        tensors=sum(len(f.tensors) for f in mine),
        bytes_written=total,
        read_ranges=reads.ranges,
    )


@dataclass(frozen=True)
class _Writing:
    """A planned run about to write into its folder."""

    folder: Path
    files: Sequence[PlannedFile]
    mine: Sequence[PlannedFile]
    """The files this run writes: all of them, or its part's."""
    params: Mapping[str, SourceParam]
    metadata: Mapping[str, str]
    options: RunOptions
    kind: FolderKind
    executor: Executor
    budget: MemoryBudget

    def write(
        self, then: Sequence[SmallFile], index: Index, inputs: Sequence[Path], progress: Progress
    ) -> Reads:
        """Claim the folder (resuming an unfinished run of the same plan), have the executor
        write the files still missing, then the small files and the index, last; on failure,
        leave none of the files half-written, and say that rerunning resumes."""
        mine, part = self.mine, self.options.part
        layouts = {f.name: layout_shard([t.entry for t in f.tensors], self.metadata) for f in mine}
        check: BandCheck = FiniteCheck(self.options.strict)
        run_fingerprint = fingerprint(self.files, self.params, self.metadata, check)
        sizes = {f.name: layouts[f.name].size for f in mine}
        identify = part is not None or self.executor.remote
        with claim_output_dir(
            self.folder,
            run_fingerprint,
            sizes,
            self.options.overwrite,
            kind=self.kind,
            inputs=inputs,
            part=part,
            identify=identify,
        ) as output:
            pending = [f for f in mine if f.name not in output.finished]
            if len(pending) < len(mine):
                log.info(
                    "resuming: %d of %d file(s) already complete in %s (checked%s)",
                    len(mine) - len(pending),
                    len(mine),
                    self.folder,
                    f"; written by {output.parts_taken} part(s)" if output.parts_taken else "",
                )
                progress.advance(sum(f.nbytes for f in mine if f.name in output.finished))
            task = self._task(pending, layouts, check)
            try:
                reads = self.executor.write(task, output, progress) if pending else Reads()
                if part:
                    return reads
                output.sweep()
                for small in then:
                    small.write(self.folder / small.name)
                output.finish(self.kind, index)
                return reads
            except OutputError as e:
                raise OutputError(f"{e}; {output.progress} once the cause is fixed") from e
            except KeyboardInterrupt as e:
                raise Interrupted(f"no partial file was left behind; {output.progress}") from e

    def _task(
        self,
        files: Sequence[PlannedFile],
        layouts: Mapping[str, ShardLayout],
        check: BandCheck,
    ) -> WriteTask:
        whole = WriteTask(self.folder, tuple(files), layouts, self.params, check, self.budget)
        return whole.only(files)


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
