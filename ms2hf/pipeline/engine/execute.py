"""Executing a write plan: every output tensor produced band by band into reused buffers and
written at its place in its file, by a few worker threads.

Each file's header is fixed before its first byte (the plan knows every name, dtype and shape),
so tensors can be written in any order and by any worker, and the bytes come out the same for
any worker count. A file gets its final name once its last tensor is written; on any error every
unfinished file is removed, so nothing with a final name is ever partial. The output folder is
claimed first (``ms2hf.pipeline.engine.output_dir``): files a killed run of the same plan
finished are verified and kept, each file committed now is recorded with its digest, and the
small files that describe the set (the index last) are written only once every shard is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ms2hf.errors import FormatError, OutputError
from ms2hf.io.dtypes import to_numpy
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.safetensors_writer import ShardLayout, ShardWriter, layout_shard
from ms2hf.io.sources.plan import SourceParam
from ms2hf.pipeline.engine.assemble import assembled_bands, fit_row
from ms2hf.pipeline.engine.budget import MemoryBudget
from ms2hf.pipeline.engine.checks import source_has_nonfinite
from ms2hf.pipeline.engine.output_dir import HF_FOLDER, FolderKind, OutputRun, claim_output_dir
from ms2hf.pipeline.engine.progress import Progress
from ms2hf.pipeline.plan import PlannedFile, PlannedTensor

BandCheck = Callable[[PlannedTensor, np.ndarray, Callable[[], bool]], None]
"""Called on every assembled band before it is written (finiteness checks), with a function
telling whether the tensor's source already holds NaN or inf (read only when asked). Its
``repr`` is part of the plan's fingerprint (a rerun with another check is another run), so it
must be stable: a frozen dataclass, not a lambda."""

log = logging.getLogger("ms2hf")


@dataclass(frozen=True)
class SmallFile:
    """A file written whole once every shard is in place (config, index): ``write(path)``
    must write it atomically (``ms2hf.io.hf_output``)."""

    name: str
    write: Callable[[Path], None]


class _OpenFile:
    def __init__(self, writer: ShardWriter, remaining: int) -> None:
        self.writer = writer
        self.remaining = remaining


class _Run:
    def __init__(
        self,
        output: OutputRun,
        files: Sequence[PlannedFile],
        layouts: Mapping[str, ShardLayout],
        params: Mapping[str, SourceParam],
        budget: MemoryBudget,
        progress: Progress,
        mapped: MappedFiles,
        check: BandCheck | None,
    ) -> None:
        self.output = output
        self.layouts = layouts
        self.params = params
        self.budget = budget
        self.progress = progress
        self.mapped = mapped
        self.check = check
        # Within a file, largest tensors first: the jobs left at the end are small, so no worker
        # idles while another finishes the embedding alone.
        self.jobs = iter(
            [(f, t) for f in files for t in sorted(f.tensors, key=lambda t: -t.entry.nbytes)]
        )
        self.lock = threading.Lock()
        self.open: dict[str, _OpenFile] = {}
        self.failed = False

    def _next(self) -> tuple[PlannedFile, PlannedTensor] | None:
        with self.lock:
            if self.failed:
                return None
            job = next(self.jobs, None)
            if job is not None and job[0].name not in self.open:
                f = job[0]
                writer = ShardWriter(self.output.folder / f.name, self.layouts[f.name])
                self.open[f.name] = _OpenFile(writer, len(f.tensors))
            return job

    def _done(self, f: PlannedFile) -> None:
        with self.lock:
            state = self.open[f.name]
            state.remaining -= 1
            finished = state.remaining == 0
        if finished:
            self.output.record(f.name, state.writer.commit())
            with self.lock:
                del self.open[f.name]

    def worker(self) -> None:
        buffer = np.empty(self.budget.band_bytes, dtype=np.uint8)
        try:
            while (job := self._next()) is not None:
                f, planned = job
                buffer = self._write_tensor(self.open[f.name].writer, planned, buffer)
                self._done(f)
        except BaseException:
            with self.lock:
                self.failed = True
            raise

    def _write_tensor(
        self, writer: ShardWriter, planned: PlannedTensor, buffer: np.ndarray
    ) -> np.ndarray:
        tensor = planned.tensor
        dtype = to_numpy(planned.dtype)
        buffer = fit_row(buffer, tensor, dtype)
        in_source = partial(source_has_nonfinite, tensor, self.params, self.mapped)
        for offset, band, raw in assembled_bands(tensor, dtype, buffer, self.params, self.mapped):
            if self.check is not None:
                self.check(planned, band, in_source)
            writer.write(tensor.name, offset, raw)
            self.progress.advance(len(raw))
        return buffer

    def abort(self) -> None:
        for state in self.open.values():
            state.writer.abort()
        self.open.clear()


def _fingerprint(
    files: Sequence[PlannedFile],
    params: Mapping[str, SourceParam],
    metadata: Mapping[str, str],
    check: BandCheck | None,
) -> str:
    """What decides the bytes of a run: every output tensor's recipe, the source blocks it reads,
    and the identity (size, modification time) of every source file. A recipe is described by its
    ``repr`` (frozen dataclasses of ints, strings and tuples: exact, and ten times cheaper than
    ``dataclasses.astuple`` on a plan of 37,000 tensors)."""
    used = sorted({name for f in files for t in f.tensors for name in t.tensor.sources})
    where: dict[Path, str] = {}
    stats: dict[str, list[int]] = {}
    for path in {b.path for name in used for b in params[name].blocks}:
        try:
            st = os.stat(path)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
        where[path] = str(path.resolve())
        stats[where[path]] = [st.st_size, st.st_mtime_ns]
    doc = {
        "metadata": dict(metadata),
        "check": repr(check),
        "files": [[f.name, [[t.dtype, repr(t.tensor)] for t in f.tensors]] for f in files],
        "sources": {
            name: [
                params[name].dtype,
                params[name].shape,
                [[where[b.path], b.start, b.offsets, b.shape] for b in params[name].blocks],
            ]
            for name in used
        },
        "stats": stats,
    }
    return hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=16).hexdigest()


Index = Mapping[str, Any]
"""The document a run writes last under its folder kind's index name (``model.safetensors.
index.json``, ``param_name_map.json``): its presence means the set is complete."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by the user after it claimed its folder: the message says what is kept."""


def write_files(
    out_dir: Path,
    files: Sequence[PlannedFile],
    params: Mapping[str, SourceParam],
    metadata: Mapping[str, str],
    budget: MemoryBudget,
    progress: Progress,
    mapped: MappedFiles,
    check: BandCheck | None = None,
    *,
    then: Sequence[SmallFile] = (),
    index: Index,
    overwrite: bool = False,
    kind: FolderKind = HF_FOLDER,
    inputs: Sequence[Path] = (),
) -> None:
    """Write every planned file into ``out_dir`` (accepted by ``prepare_output_dir``), then the
    small files ``then`` and the index, last; resume an unfinished run of the same plan; on
    failure, leave none of the files half-written, and say that rerunning resumes."""
    layouts = {f.name: layout_shard([t.entry for t in f.tensors], metadata) for f in files}
    fingerprint = _fingerprint(files, params, metadata, check)
    sizes = {name: layout.size for name, layout in layouts.items()}
    names = [s.name for s in then]
    with claim_output_dir(out_dir, fingerprint, sizes, names, overwrite, kind, inputs) as output:
        pending = [f for f in files if f.name not in output.finished]
        if len(pending) < len(files):
            log.info(
                "resuming: %d of %d file(s) already complete in %s (sizes and digests checked)",
                len(files) - len(pending),
                len(files),
                out_dir,
            )
            progress.advance(sum(f.nbytes for f in files if f.name in output.finished))
        try:
            _execute(_Run(output, pending, layouts, params, budget, progress, mapped, check))
            for small in then:
                small.write(out_dir / small.name)
            output.finish(kind, index)
        except OutputError as e:
            raise OutputError(f"{e}; {output.progress} once the cause is fixed") from e
        except KeyboardInterrupt as e:
            raise Interrupted(f"no partial file was left behind; {output.progress}") from e


def _execute(run: _Run) -> None:
    try:
        if run.budget.workers == 1:
            run.worker()
        else:
            with ThreadPoolExecutor(run.budget.workers, thread_name_prefix="ms2hf") as pool:
                futures = [pool.submit(run.worker) for _ in range(run.budget.workers)]
                for future in futures:
                    future.result()
    except BaseException:
        run.abort()
        raise
