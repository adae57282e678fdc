"""Executing a write plan: every output tensor produced band by band into reused buffers and
written at its place in its file, by a few worker threads.

Each file's header is fixed before its first byte (the plan knows every name, dtype and shape),
so tensors can be written in any order and by any worker, and the bytes come out the same for
any worker count. A file gets its final name once its last tensor is written; on any error every
unfinished file is removed, so nothing with a final name is ever partial.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ms2hf.io.dtypes import to_numpy
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.safetensors_writer import ShardWriter, TensorEntry, layout_shard
from ms2hf.pipeline.assemble import fill_rows, row_bands
from ms2hf.pipeline.budget import MemoryBudget
from ms2hf.pipeline.progress import Progress
from ms2hf.pipeline.source_plan import SourceParam
from ms2hf.transforms.rules import OutputTensor


@dataclass(frozen=True)
class PlannedTensor:
    tensor: OutputTensor
    dtype: str

    @property
    def entry(self) -> TensorEntry:
        return TensorEntry(self.tensor.name, self.dtype, self.tensor.shape)


@dataclass(frozen=True)
class PlannedFile:
    name: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


BandCheck = Callable[[PlannedTensor, np.ndarray], None]
"""Called on every assembled band before it is written (finiteness checks, hashing)."""


class _OpenFile:
    def __init__(self, writer: ShardWriter, remaining: int) -> None:
        self.writer = writer
        self.remaining = remaining


class _Run:
    def __init__(
        self,
        out_dir: Path,
        files: Sequence[PlannedFile],
        params: Mapping[str, SourceParam],
        metadata: Mapping[str, str],
        budget: MemoryBudget,
        progress: Progress,
        mapped: MappedFiles,
        check: BandCheck | None,
    ) -> None:
        self.out_dir = out_dir
        self.files = files
        self.params = params
        self.metadata = metadata
        self.budget = budget
        self.progress = progress
        self.mapped = mapped
        self.check = check
        self.jobs = iter([(f, t) for f in files for t in f.tensors])
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
                layout = layout_shard([t.entry for t in f.tensors], self.metadata)
                self.open[f.name] = _OpenFile(ShardWriter(self.out_dir / f.name, layout), len(f.tensors))
            return job

    def _done(self, f: PlannedFile) -> None:
        with self.lock:
            state = self.open[f.name]
            state.remaining -= 1
            finished = state.remaining == 0
        if finished:
            state.writer.commit()
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

    def _write_tensor(self, writer: ShardWriter, planned: PlannedTensor, buffer: np.ndarray) -> np.ndarray:
        tensor = planned.tensor
        dtype = to_numpy(planned.dtype)
        row_bytes = tensor.row_elements * dtype.itemsize
        param = self.params[tensor.source]
        for r0, r1 in row_bands(tensor.rows, row_bytes, len(buffer)):
            nbytes = (r1 - r0) * row_bytes
            if nbytes > len(buffer):  # a single row larger than the band
                buffer = np.empty(nbytes, dtype=np.uint8)
            band = buffer[:nbytes].view(dtype).reshape(r1 - r0, tensor.row_elements)
            fill_rows(band, tensor, r0, param, self.mapped)
            if self.check is not None:
                self.check(planned, band)
            writer.write(tensor.name, r0 * row_bytes, buffer[:nbytes])
            self.progress.advance(nbytes)
        return buffer

    def abort(self) -> None:
        for state in self.open.values():
            state.writer.abort()
        self.open.clear()


def write_files(
    out_dir: Path,
    files: Sequence[PlannedFile],
    params: Mapping[str, SourceParam],
    metadata: Mapping[str, str],
    budget: MemoryBudget,
    progress: Progress,
    mapped: MappedFiles,
    check: BandCheck | None = None,
) -> None:
    """Write every planned file into ``out_dir``; on failure, leave none of them half-written."""
    run = _Run(out_dir, files, params, metadata, budget, progress, mapped, check)
    try:
        if budget.workers == 1:
            run.worker()
        else:
            with ThreadPoolExecutor(budget.workers, thread_name_prefix="ms2hf") as pool:
                futures = [pool.submit(run.worker) for _ in range(budget.workers)]
                for future in futures:
                    future.result()
    except BaseException:
        run.abort()
        raise
