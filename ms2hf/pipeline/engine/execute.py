"""The unit of work of every executor: write some planned files into a folder, each output tensor
produced band by band into reused buffers and written at its place in its file, by a few worker
threads.

Each file's header is fixed before its first byte (the plan knows every name, dtype and shape),
so tensors can be written in any order and by any worker, and the bytes come out the same for
any worker count, and on any host. A file gets its final name once its last tensor is written,
and is then reported with its digest (``committed``); on any error every unfinished file is
removed, so nothing with a final name is ever partial. The local executor runs one ``WriteTask``
for all the files of a run in its own process; the Ray executor runs one per group of files on
the cluster's hosts (``ms2hf.pipeline.executors``). Claiming the output folder, resuming and the
small files that describe the set are the run's business (``ms2hf.pipeline.run``), not this one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from ms2hf.io.dtypes import to_numpy
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.safetensors_writer import ShardLayout, ShardWriter
from ms2hf.io.sources.plan import SourceParam
from ms2hf.pipeline.engine.assemble import (
    MappedSource,
    Source,
    aligned,
    assembled_bands,
    fill_rows_from,
    fit_row,
    stage,
    staged_bytes,
)
from ms2hf.pipeline.engine.blas import one_blas_thread
from ms2hf.pipeline.engine.budget import MemoryBudget
from ms2hf.pipeline.engine.checks import source_has_nonfinite
from ms2hf.pipeline.engine.jobs import STAGE_SHARE, Job, plan_jobs
from ms2hf.pipeline.engine.progress import Progress
from ms2hf.pipeline.plan import PlannedFile, PlannedTensor

BandCheck = Callable[[PlannedTensor, np.ndarray, Callable[[], bool]], None]
"""Called on every assembled band before it is written (finiteness checks), with a function
telling whether the tensor's source already holds NaN or inf (read only when asked). Its
``repr`` is part of the plan's fingerprint (a rerun with another check is another run), so it
must be stable: a frozen dataclass, not a lambda; and it travels with a ``WriteTask`` to other
hosts, so it must pickle. A check may also have ``clean(dtype, values) -> bool``: true when it
would pass every band cut from ``values``; the tensors of a staged parameter it calls clean are
then not checked one by one."""

Committed = Callable[[str, str], None]
"""Told ``(file name, content digest)`` as each file gets its final name."""


class Sink(Protocol):
    """Where one file's bytes go, tensor by tensor (each front to back): a ``ShardWriter``, or
    ``verify``'s comparison with a file already written."""

    def write(self, name: str, offset: int, data: np.ndarray) -> None: ...

    def write_run(self, names: Sequence[str], sizes: Sequence[int], data: np.ndarray) -> None:
        """Whole tensors, one after another in the layout's order, their bytes in ``data``."""

    def commit(self) -> str: ...

    def abort(self) -> None: ...


Opener = Callable[["WriteTask", PlannedFile], Sink]
"""Makes the sink of one file of a task."""


def open_shard(task: WriteTask, f: PlannedFile) -> Sink:
    """The file, written under a temporary name of the task's attempt (the default sink)."""
    return ShardWriter(task.folder / f.name, task.layouts[f.name], task.attempt)


@dataclass(frozen=True)
class WriteTask:
    """Planned files to write into one folder, and everything needed to write them: plain,
    picklable data (a Ray task carries one to another host)."""

    folder: Path
    files: tuple[PlannedFile, ...]
    layouts: Mapping[str, ShardLayout]
    """Each file's header and tensor offsets (``layout_shard``), by file name."""
    params: Mapping[str, SourceParam]
    """The source parameters the files read (at least)."""
    check: BandCheck | None
    budget: MemoryBudget
    attempt: str = ""
    """Tags the temporary names, so that attempts at the same file (a task retried on another
    host while the first may still write) never share one."""

    def only(self, files: Sequence[PlannedFile]) -> WriteTask:
        """This task narrowed to ``files``, carrying only what they read."""
        names = {name for f in files for t in f.tensors for name in t.tensor.sources}
        return WriteTask(
            self.folder,
            tuple(files),
            {f.name: self.layouts[f.name] for f in files},
            {name: self.params[name] for name in sorted(names)},
            self.check,
            self.budget,
            self.attempt,
        )


class _OpenFile:
    def __init__(self, writer: Sink, layout: ShardLayout, remaining: int) -> None:
        self.writer = writer
        self.remaining = remaining
        self.order = {e.name: i for i, e in enumerate(layout.entries)}


class _Run:
    def __init__(
        self,
        task: WriteTask,
        mapped: MappedFiles,
        progress: Progress,
        committed: Committed,
        opener: Opener,
    ) -> None:
        self.task = task
        self.opener = opener
        self.params = task.params
        self.mapped = mapped
        self.progress = progress
        self.committed = committed
        self.check = task.check
        band = task.budget.band_bytes
        self.jobs = iter(plan_jobs(task.files, task.layouts, task.params, band))
        self.lock = threading.Lock()
        self.runs = threading.Lock()
        """One run at a time: a run is Python's work more than numpy's, and two threads doing
        such work at once only take the interpreter lock from each other."""
        self.open: dict[str, _OpenFile] = {}
        self.failed = False

    def _next(self) -> Job | None:
        with self.lock:
            if self.failed:
                return None
            job = next(self.jobs, None)
            if job is not None and job.file.name not in self.open:
                f = job.file
                writer = self.opener(self.task, f)
                self.open[f.name] = _OpenFile(writer, self.task.layouts[f.name], len(f.tensors))
            return job

    def _done(self, job: Job) -> None:
        f = job.file
        with self.lock:
            state = self.open[f.name]
            state.remaining -= len(job.tensors)
            finished = state.remaining == 0
        if finished:
            self.committed(f.name, state.writer.commit())
            with self.lock:
                del self.open[f.name]

    def worker(self) -> None:
        band_bytes = self.task.budget.band_bytes
        buffer = np.empty(band_bytes, dtype=np.uint8)
        try:
            while (job := self._next()) is not None:
                state = self.open[job.file.name]
                if job.run:
                    with self.runs:
                        self._write_run(state, job, buffer[:band_bytes])
                else:
                    buffer = self._write_tensor(state.writer, job.tensors[0], buffer)
                self._done(job)
        except BaseException:
            with self.lock:
                self.failed = True
            raise

    def _write_tensor(self, writer: Sink, planned: PlannedTensor, buffer: np.ndarray) -> np.ndarray:
        """Write one tensor in bands of the worker's ``buffer``, which is returned, grown for
        a fine-tuned tensor's merge (``MemoryBudget.merge_bytes``) or a row larger than it."""
        tensor = planned.tensor
        dtype = to_numpy(planned.dtype)
        budget = self.task.budget
        size = budget.band_bytes if tensor.delta is None else budget.merge_bytes
        if len(buffer) < size:
            buffer = np.empty(size, dtype=np.uint8)
        work = fit_row(buffer[:size], tensor, dtype)
        in_source = partial(source_has_nonfinite, tensor, self.params, self.mapped)
        for offset, band, raw in assembled_bands(tensor, dtype, work, self.params, self.mapped):
            if self.check is not None:
                self.check(planned, band, in_source)
            writer.write(tensor.name, offset, raw)
            self.progress.advance(len(raw))
        return work if len(work) > len(buffer) else buffer

    def _write_run(self, state: _OpenFile, job: Job, buffer: np.ndarray) -> None:
        """Make each tensor of a run whole in the second half of ``buffer`` (staging the
        parameters that give several of them in the first half; ``plan_jobs`` made both fit)
        and write the tensors that follow each other with one write per half buffer."""
        writer, order = state.writer, state.order
        stage_bytes = len(buffer) // STAGE_SHARE
        area = buffer[stage_bytes:]
        sources: dict[tuple[str, str], tuple[Source, bool]] = {}
        clean = getattr(self.check, "clean", None)
        staged_at = 0
        names: list[str] = []
        sizes: list[int] = []
        used = 0
        last = -2

        def flush() -> None:
            nonlocal used
            if names:
                writer.write_run(names, sizes, area[:used])
                self.progress.advance(used)
                names.clear()
                sizes.clear()
                used = 0

        for planned in job.tensors:
            tensor = planned.tensor
            dtype = to_numpy(planned.dtype)
            key = (tensor.source, planned.dtype)
            found = sources.get(key)
            if found is None:
                param = self.params[tensor.source]
                if key in job.staged:
                    size = staged_bytes(param, dtype)
                    staged = stage(param, dtype, buffer[staged_at : staged_at + size], self.mapped)
                    staged_at += aligned(size)
                    checked = clean is not None and clean(planned.dtype, staged.values)
                    found = sources[key] = (staged, checked)
                else:
                    found = sources[key] = (MappedSource(param, self.mapped), False)
            source, checked = found
            n = planned.entry.nbytes
            at = order[tensor.name]
            if at != last + 1 or used + n > len(area):
                flush()
            last = at
            raw = area[used : used + n]
            band = raw.view(dtype).reshape(tensor.rows, tensor.row_elements)
            fill_rows_from(band, tensor, 0, source)
            if self.check is not None and not checked:
                in_source = partial(source_has_nonfinite, tensor, self.params, self.mapped)
                self.check(planned, band, in_source)
            names.append(tensor.name)
            sizes.append(n)
            used += n
        flush()

    def abort(self) -> None:
        for state in self.open.values():
            state.writer.abort()
        self.open.clear()


def write_task(
    task: WriteTask,
    mapped: MappedFiles,
    progress: Progress,
    committed: Committed,
    opener: Opener = open_shard,
) -> None:
    """Write every file of ``task`` with ``task.budget.workers`` threads, reading through
    ``mapped``; ``committed`` is told of each file as it gets its final name. On failure, no
    unfinished file is left behind (files already committed stay). ``opener`` gives each
    file's sink: the file itself, by default."""
    run = _Run(task, mapped, progress, committed, opener)
    try:
        with one_blas_thread():
            if task.budget.workers == 1:
                run.worker()
            else:
                with ThreadPoolExecutor(task.budget.workers, thread_name_prefix="ms2hf") as pool:
                    futures = [pool.submit(run.worker) for _ in range(task.budget.workers)]
                    for future in futures:
                        future.result()
    except BaseException:
        run.abort()
        raise
