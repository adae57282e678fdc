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

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params.values())
