"""The source plan: what every source format becomes, from headers and metadata alone.

For every model parameter, its full shape, dtype and the blocks that tile it (a file, a byte
offset, where the block sits in the full tensor, its shape), plus the training scalars and the
byte counts a report needs. Legacy rank folders, unified folders and Checkpoint 2.0 iterations
are each read by their own module in ``ms2hf.io.sources`` into this one form, and everything
downstream (model rules, planning, the engine) sees only it: adding a format adds a reader, not
special cases. Placement math and coverage checks belong to the readers (``docs/layout-math.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ms2hf.io.dtypes import nbytes
from ms2hf.io.placement import Grid
from ms2hf.io.safetensors_reader import TensorInfo


@dataclass(frozen=True)
class Block:
    """One rank file's slice of a parameter, and where it goes in the full tensor."""

    path: Path
    rank: int
    key: str
    start: int
    """Absolute byte offset of the slice in ``path``."""
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SourceParam:
    name: str
    shape: tuple[int, ...]
    dtype: str
    blocks: tuple[Block, ...]
    """One block per grid cell (the lowest rank's copy), in grid order."""
    replicas: tuple[Block, ...] = ()
    """Further copies, present when redundancy was not removed; for ``--check-replicas``."""
    holders: tuple[tuple[int, ...], ...] = ()
    """For each block, the global ranks that held it in training (who saved it, or could have),
    ascending; empty when the format does not say (a unified folder)."""

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def whole_param(path: Path, rank: int, info: TensorInfo) -> SourceParam:
    """A tensor stored whole in one file (a scalar, a merged parameter): one block at the origin."""
    block = Block(path, rank, info.name, info.start, (0,) * len(info.shape), info.shape)
    return SourceParam(info.name, info.shape, info.dtype, (block,))


@dataclass(frozen=True)
class SourceFile:
    """One file the plan reads from, and which rank (and pipeline stage) saved it."""

    rank: int
    stage: int
    path: Path
    metadata: Mapping[str, str]


LEGACY = "legacy"
"""``checkpoint/rank_N/`` folders with ``strategy/`` files (``docs/legacy-format.md``)."""
CKPT2 = "Checkpoint 2.0"
"""``checkpoint/iteration_XXXXXXXX/`` folders with ``metadata.json`` (``docs/checkpoint2.md``)."""
UNIFIED = "unified"
"""A merged folder of whole parameters."""


@dataclass(frozen=True)
class StepChoice:
    """Which saved step a plan reads, among which, and why: a reader never picks one silently."""

    present: tuple[str, ...]
    """Every step found, oldest first."""
    reason: str
    """``--step``, ``the tracker's``, ``the folder given``, ``the newest in every rank folder``."""


@dataclass
class SourcePlan:
    step: str
    files: tuple[SourceFile, ...]
    params: dict[str, SourceParam]
    scalars: dict[str, SourceParam]
    """Training scalars (step counters, loss scale), each a single block from the lowest rank
    holding it: what ``merge`` copies into ``hyper_param.safetensors``."""
    remove_redundancy: bool
    num_stages: int
    grids: dict[str, Grid] = field(default_factory=dict)
    """How the strategy cuts each parameter it lays out; one absent is stored whole."""
    optimizer_bytes: int = 0
    scalar_bytes: int = 0
    source_format: str = LEGACY
    root: Path | None = None
    """The folder read: the rank folders' parent, the iteration folder, the unified folder."""
    ranks: int = 0
    """Ranks of the training run (a de-duplicated Checkpoint 2.0 save has fewer files)."""
    choice: StepChoice | None = None
    counters: dict[str, Any] = field(default_factory=dict)
    """The run's counters where the format keeps them outside the tensors (``common.json``)."""

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params.values())
