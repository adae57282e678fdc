"""The jobs a ``WriteTask``'s workers take, one at a time: a large tensor, made band by band; or a
run of small tensors that follow each other in their file, each made whole and written together.

Per-tensor costs (a job handed out, a file's blocks looked up, a write, a checksum) are small
until a model has tens of thousands of tensors: a 96-layer Qwen3-MoE with 128 experts has 37,000,
most of them a few KiB. In a run, a parameter that gives several of its tensors (an MoE layer's
grouped expert weights give 384) is staged once, cast whole into the first half of the worker's
buffer (``assemble.stage``), and each tensor is cut from it; the run's tensors are made one after
another in the second half and written with one write per half buffer. An MoE layer is then one
job, not 393.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ms2hf.io.dtypes import to_numpy
from ms2hf.io.safetensors_writer import ShardLayout
from ms2hf.io.sources.plan import SourceParam
from ms2hf.pipeline.engine.assemble import aligned, staged_bytes
from ms2hf.pipeline.plan import PlannedFile, PlannedTensor

STAGE_SHARE = 2
"""A worker's buffer is cut in two: staged parameters in the first half, the run's tensors
made in the second."""
RUN_BANDS = 4
"""A run holds at most this many buffers' worth of tensors: enough to spread its set-up over
many tensors, few enough to spread the work over the workers."""


@dataclass(frozen=True)
class Job:
    file: PlannedFile
    tensors: tuple[PlannedTensor, ...]
    staged: frozenset[tuple[str, str]]
    """``(parameter, output dtype)`` pairs staged for a run: cast to that dtype, whole."""
    nbytes: int
    run: bool
    """Small tensors made whole, one after another, and written together; else one tensor,
    made band by band."""


def _alone(tensor: PlannedTensor, area: int) -> bool:
    """Made band by band: larger than a run's area, scaled (assembled in fp32 first) or merged
    with a LoRA delta (in float64 first)."""
    t = tensor.tensor
    return tensor.entry.nbytes > area or t.scale != 1.0 or t.delta is not None


def plan_jobs(
    files: Sequence[PlannedFile],
    layouts: Mapping[str, ShardLayout],
    params: Mapping[str, SourceParam],
    band_bytes: int,
) -> list[Job]:
    """The jobs of a task: files in turn, each file's largest jobs first (the jobs left at the
    end are small, so no worker idles while another finishes the embedding alone)."""
    jobs: list[Job] = []
    for f in files:
        in_file = _Runs(f, params, band_bytes).jobs(layouts[f.name])
        jobs += sorted(in_file, key=lambda j: -j.nbytes)
    return jobs


class _Runs:
    """One file's jobs, its tensors taken in file order (a run's tensors are neighbours). A run
    stages at most half a buffer of parameters and makes at most ``RUN_BANDS`` buffers of
    tensors; a new one starts where either would overflow."""

    def __init__(self, f: PlannedFile, params: Mapping[str, SourceParam], band_bytes: int) -> None:
        self.file = f
        self.params = params
        self.band_bytes = band_bytes
        self.stage_bytes = band_bytes // STAGE_SHARE
        self.area = band_bytes - self.stage_bytes
        self.uses: dict[tuple[str, str], int] = {}
        for t in f.tensors:
            if not _alone(t, self.area):
                key = (t.tensor.source, t.dtype)
                self.uses[key] = self.uses.get(key, 0) + 1
        self.done: list[Job] = []
        self.run: list[PlannedTensor] = []
        self.staged: set[tuple[str, str]] = set()
        self.run_bytes = self.staged_total = 0

    def close(self) -> None:
        if self.run:
            staged = frozenset(self.staged)
            self.done.append(Job(self.file, tuple(self.run), staged, self.run_bytes, True))
        self.run, self.staged = [], set()
        self.run_bytes = self.staged_total = 0

    def jobs(self, layout: ShardLayout) -> list[Job]:
        by_name = {t.tensor.name: t for t in self.file.tensors}
        for entry in layout.entries:
            t = by_name[entry.name]
            if _alone(t, self.area):
                self.close()
                self.done.append(Job(self.file, (t,), frozenset(), entry.nbytes, False))
                continue
            if self.run_bytes + entry.nbytes > RUN_BANDS * self.band_bytes:
                self.close()
            key = (t.tensor.source, t.dtype)
            if self.uses[key] > 1 and key not in self.staged:
                size = aligned(staged_bytes(self.params[key[0]], to_numpy(t.dtype)))
                if size <= self.stage_bytes:
                    if self.staged_total + size > self.stage_bytes:
                        self.close()
                    self.staged.add(key)
                    self.staged_total += size
            self.run.append(t)
            self.run_bytes += entry.nbytes
        self.close()
        return self.done
