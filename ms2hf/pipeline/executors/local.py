"""The local executor: a run's files written by worker threads of this process."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from ms2hf.io.mapped import MappedFiles
from ms2hf.pipeline.engine.budget import MemoryBudget
from ms2hf.pipeline.engine.execute import WriteTask, write_task
from ms2hf.pipeline.engine.output_dir import OutputRun
from ms2hf.pipeline.engine.progress import Progress
from ms2hf.pipeline.executors import Reads


@dataclass(frozen=True)
class LocalExecutor:
    record_reads: bool = False
    """Keep every byte range read (tests)."""
    remote = False

    def session(self, budget: MemoryBudget) -> AbstractContextManager[None]:
        return nullcontext()

    def write(self, task: WriteTask, output: OutputRun, progress: Progress) -> Reads:
        with MappedFiles() as mapped:
            mapped.record = self.record_reads
            write_task(task, mapped, progress, output.record)
            return Reads(mapped.bytes_viewed, sorted(set(mapped.ranges)))
