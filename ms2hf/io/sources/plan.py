"""The source plan: what every source format becomes, from headers and metadata alone.

For every model parameter, its full shape, dtype and the blocks that tile it (a file, a byte
offset, where the block sits in the full tensor, its shape), plus the training scalars and the
byte counts a report needs. Legacy rank folders, unified folders and Checkpoint 2.0 iterations
are each read by their own module in ``ms2hf.io.sources`` into this one form, and everything
downstream (model rules, planning, the engine) sees only it: adding a format adds a reader, not
special cases. Placement math and coverage checks belong to the readers (``docs/layout-math.md``).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ms2hf.io.dtypes import nbytes
from ms2hf.io.placement import Grid
from ms2hf.io.safetensors_reader import TensorInfo


@dataclass(frozen=True, slots=True)
class Block:
    """One rank file's slice of a parameter, and where it goes in the full tensor."""

    path: Path
    rank: int
    key: str
    start: int
    """Absolute byte offset of the slice in ``path``."""
    offsets: tuple[int, ...]
    shape: tuple[int, ...]


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """Every tensor is handled as rows x columns: dim 0, and the product of the rest."""
    if not shape:
        return 1, 1
    cols = 1
    for d in shape[1:]:
        cols *= d
    return shape[0], cols


Tile = tuple[Block, int, int, int, int]
"""A block as a window of its parameter's matrix: ``(block, first row, rows, first column,
columns)``."""


class BlockIndex:
    """A parameter's blocks by where they sit in its matrix, so that the few blocks a band of
    rows and columns needs are found by bisection instead of by scanning every block: an MoE
    layer's grouped weights on 4096 ranks (EP32 x 8 optimizer chunks) have 256 blocks each, and
    each of its 384 expert tensors needs one or two of them (9.4 million block checks per
    conversion of that save when every tensor scanned every block).

    Blocks are grouped into row bands (equal first row and row count); when the bands, and the
    blocks within each band, do not overlap (every reader's grid), a query looks only at the
    bands and blocks it meets. Otherwise every block is returned, in plan order, as it is for a
    query of the whole matrix. A query may return blocks that miss the window: callers intersect
    each one anyway. The bands are built on the first query that needs them."""

    def __init__(self, blocks: Sequence[Block], shape: tuple[int, ...]) -> None:
        self.rows, self.cols = as_matrix(shape)
        self.tiles: list[Tile] = []
        matrices: dict[tuple[int, ...], tuple[int, int]] = {}
        for b in blocks:
            m = matrices.get(b.shape)
            if m is None:
                m = matrices[b.shape] = as_matrix(b.shape)
            r0 = b.offsets[0] if b.offsets else 0
            c0 = b.offsets[1] if len(b.offsets) > 1 else 0
            self.tiles.append((b, r0, m[0], c0, m[1]))
        self._bands: list[tuple[int, int, list[Tile]]] | None = None
        self._row_ends: list[int] = []
        self._col_ends: list[list[int]] = []
        self._disjoint = True

    def _build(self) -> list[tuple[int, int, list[Tile]]]:
        tiles = self.tiles
        if any((a[1], a[3]) > (b[1], b[3]) for a, b in itertools.pairwise(tiles)):
            tiles = sorted(tiles, key=lambda t: (t[1], t[2], t[3]))
        bands: list[tuple[int, int, list[Tile]]] = []
        for t in tiles:
            if bands and bands[-1][0] == t[1] and bands[-1][1] == t[2]:
                bands[-1][2].append(t)
            else:
                bands.append((t[1], t[2], [t]))
        self._disjoint = all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(bands)) and all(
            a[3] + a[4] <= b[3] for _, _, band in bands for a, b in itertools.pairwise(band)
        )
        self._row_ends = [r0 + rows for r0, rows, _ in bands]
        self._col_ends = [[t[3] + t[4] for t in band] for _, _, band in bands]
        self._bands = bands
        return bands

    def covering(self, row0: int, row1: int, col0: int, col1: int) -> Iterator[Tile]:
        """The blocks that may hold matrix rows ``[row0, row1)`` x columns ``[col0, col1)``."""
        if row0 <= 0 and row1 >= self.rows and col0 <= 0 and col1 >= self.cols:
            yield from self.tiles
            return
        bands = self._bands if self._bands is not None else self._build()
        if not self._disjoint:
            yield from self.tiles
            return
        i = bisect.bisect_right(self._row_ends, row0)
        while i < len(bands) and bands[i][0] < row1:
            band, ends = bands[i][2], self._col_ends[i]
            j = bisect.bisect_right(ends, col0)
            while j < len(band) and band[j][3] < col1:
                yield band[j]
                j += 1
            i += 1


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

    @cached_property
    def block_index(self) -> BlockIndex:
        """Built on first use, by the engine: planning does not pay for it."""
        return BlockIndex(self.blocks, self.shape)

    def __getstate__(self) -> dict[str, object]:
        """Pickled (to a Ray task) without the index: rebuilt there when used."""
        state = dict(self.__dict__)
        state.pop("block_index", None)
        return state


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
