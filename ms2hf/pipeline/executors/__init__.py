"""Executors: who runs the writing of a run's files once the folder is claimed.

Both are handed one ``WriteTask`` (``ms2hf.pipeline.engine.execute``: every file still to write)
and the claimed folder, record each file with its digest as it gets its final name, and say what
they read. The local executor writes with threads of this process (``local``); the Ray executor
cuts the task into one per group of files and runs those on a Ray cluster's hosts (``ray``,
imported only when asked for: Ray is an optional extra and slow to import).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ms2hf.pipeline.engine.budget import MemoryBudget
from ms2hf.pipeline.engine.execute import WriteTask
from ms2hf.pipeline.engine.output_dir import OutputRun
from ms2hf.pipeline.engine.progress import Progress


@dataclass(frozen=True)
class Reads:
    """What an executor read of the sources."""

    bytes_read: int = 0
    ranges: list[tuple[Path, int, int]] = field(default_factory=list)
    """Distinct ``(file, start, end)`` ranges read, when asked to record them (tests)."""


class Executor(Protocol):
    remote: bool
    """Files are written by other processes (on other hosts): their identities are recorded,
    so that a rerun trusts them without reading them back (``output_dir.IDENTITY``)."""

    def session(self, budget: MemoryBudget) -> AbstractContextManager[None]:
        """Around the whole run, from before the output folder is touched: whatever can be
        found wrong with the executor itself (a cluster out of reach, or too small for a task
        of ``budget``) is found there, with nothing written yet."""

    def write(self, task: WriteTask, output: OutputRun, progress: Progress) -> Reads:
        """Write every file of ``task``, calling ``output.record`` as each is committed."""
