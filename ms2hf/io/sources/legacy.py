"""The legacy format: ``checkpoint/rank_N/*.safetensors`` with ``strategy/`` files, as a
source plan (``docs/legacy-format.md``, ``docs/layout-math.md``).

Rank files: ``checkpoint/rank_N/{prefix}_rank_N-{epoch}_{step}.safetensors``. A folder may hold
several steps; the prefix is whatever the yaml said, so only the rank folder and the suffix are
trusted. The plan is made from headers and strategies before any tensor byte is read.

One rule serves redundant and de-duplicated saves alike: every file that has a parameter places
its block where its layout says; the lowest rank's copy of each block is the one read, the rest
are replicas; then every block of the grid must be covered. Optimizer states and scalars are
recorded for accounting but never scheduled for reading.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ms2hf.errors import CoverageError, FormatError, LayoutError
from ms2hf.io.placement import Grid, coords_table, grid, holders, offsets_table
from ms2hf.io.safetensors_reader import SafetensorsHeader, TensorInfo, read_headers
from ms2hf.io.sources.plan import (
    Block,
    SourceFile,
    SourceParam,
    SourcePlan,
    StepChoice,
    whole_param,
)
from ms2hf.io.sources.strategy import Layout, Strategy, load_strategy
from ms2hf.io.sources.training_keys import SortedKeys, sort_keys

log = logging.getLogger("ms2hf")

_RANK_DIR = re.compile(r"^rank_(\d+)$")
_STEP = re.compile(r"-(\d+)_(\d+)\.safetensors$")


def find_rank_dirs(checkpoint_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """``rank_N`` folders by rank, checked to be exactly 0..W-1."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FormatError(f"{root}: checkpoint folder does not exist or is not a folder")
    with os.scandir(root) as entries:  # is_dir from the listing: no stat per folder
        ranks = {
            int(m.group(1)): root / e.name
            for e in entries
            if (m := _RANK_DIR.match(e.name)) and e.is_dir()
        }
    if not ranks:
        raise FormatError(f"{root}: no rank_N folders (expected rank_0, rank_1, ...)")
    if max(ranks) >= len(ranks):
        # Bounded by the folders found, not by the largest number (a stray rank_99999999).
        missing = [r for r in range(min(max(ranks), len(ranks) + 8)) if r not in ranks][:8]
        total = max(ranks) + 1 - len(ranks)
        names = ", ".join(f"rank_{r}" for r in missing) + (" ..." if total > len(missing) else "")
        raise FormatError(
            f"{root}: rank folders {names} are missing (found {len(ranks)} of {max(ranks) + 1})"
        )
    return dict(sorted(ranks.items()))


def _steps(rank_dir: Path) -> dict[str, list[Path]]:
    files = list(rank_dir.iterdir())
    if any(p.suffix == ".ckpt" for p in files) and any(p.suffix == ".safetensors" for p in files):
        raise FormatError(
            f"{rank_dir}: holds both .ckpt and .safetensors checkpoints; keep one format per folder"
        )
    steps: dict[str, list[Path]] = {}
    for p in files:
        m = _STEP.search(p.name)
        if m is not None:
            steps.setdefault(f"{m.group(1)}_{m.group(2)}", []).append(p)
    return steps


def _step_key(step: str) -> tuple[int, int]:
    epoch, sub = step.split("_")
    return int(epoch), int(sub)


def incomplete_steps(rank_dirs: Mapping[int, Path]) -> dict[str, list[int]]:
    """Steps some rank folders have and others lack (a save interrupted, or still being
    written), each with the ranks that lack it; newest first."""
    return _incomplete({rank: set(steps) for rank, steps in _listed(rank_dirs).items()})


def _incomplete(per_rank: Mapping[int, set[str]]) -> dict[str, list[int]]:
    every = set.union(*per_rank.values()) if per_rank else set()
    return {
        step: [r for r, steps in per_rank.items() if step not in steps]
        for step in sorted(every, key=_step_key, reverse=True)
        if any(step not in steps for steps in per_rank.values())
    }


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(f"rank_{r}" for r in ranks[:8])
    return shown + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


RankSteps = dict[int, dict[str, list[Path]]]
"""Each rank folder's files by step: listed once per plan (``_listed``)."""


def _listed(rank_dirs: Mapping[int, Path]) -> RankSteps:
    return {rank: _steps(d) for rank, d in rank_dirs.items()}


def _in_every_rank(per_rank: RankSteps) -> list[str]:
    """The steps every rank folder has a file for, oldest first."""
    common = set.intersection(*(set(steps) for steps in per_rank.values()))
    return sorted(common, key=_step_key)


def _by_epoch(step: str, root: Path, present: list[str]) -> str:
    """``--step 1000`` for a legacy save: the one ``1000_N`` every rank has."""
    matches = [s for s in present if s.split("_")[0] == step]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FormatError(
            f"{root}: no step of epoch {step} in every rank folder (steps present: "
            f"{', '.join(present) or 'none'}); name one as EPOCH_STEP, e.g. --step "
            f"{present[-1] if present else '1000_1'}"
        )
    raise FormatError(
        f"--step {step} is ambiguous in {root}: {', '.join(matches)}; name one of them"
    )


def select_step(rank_dirs: dict[int, Path], step: str | None = None) -> tuple[str, dict[int, Path]]:
    """The chosen step and each rank's file for it; the newest step every rank has by default,
    with a warning naming the ranks that lack a newer one. A step given as its epoch alone
    (``1000``) names the one ``1000_N`` every rank has."""
    return _select(rank_dirs, _listed(rank_dirs), step)


def _select(
    rank_dirs: Mapping[int, Path], per_rank: RankSteps, step: str | None
) -> tuple[str, dict[int, Path]]:
    root = rank_dirs[min(rank_dirs)].parent
    if step is not None and "_" not in step:
        step = _by_epoch(step, root, _in_every_rank(per_rank))
    if step is None:
        common = _in_every_rank(per_rank)
        if not common:
            empty = [r for r, s in per_rank.items() if not s]
            where = (
                f"rank_{empty[0]} holds no '*-<epoch>_<step>.safetensors' file"
                if empty
                else "no step is present in every rank folder"
            )
            raise FormatError(f"{root}: {where}")
        step = common[-1]
        newer = {
            s: missing
            for s, missing in _incomplete({r: set(f) for r, f in per_rank.items()}).items()
            if _step_key(s) > _step_key(step)
        }
        for s, missing in newer.items():
            log.warning(
                "warning: step %s is missing in %s of %s (a save interrupted or still being "
                "written?); using step %s, the newest every rank has (--step chooses)",
                s,
                _ranks(missing),
                root,
                step,
            )
    chosen: dict[int, Path] = {}
    for rank, steps in per_rank.items():
        files = steps.get(step, [])
        if not files:
            raise FormatError(
                f"{rank_dirs[rank]}: no file for step {step} (expected '*-{step}.safetensors'; "
                f"this folder has steps {sorted(steps, key=_step_key) or 'none'})"
            )
        if len(files) > 1:
            raise FormatError(
                f"{rank_dirs[rank]}: {len(files)} files match step {step}: "
                f"{', '.join(sorted(p.name for p in files))}; remove all but one"
            )
        chosen[rank] = files[0]
    return step, chosen


@dataclass
class _Collecting:
    shape: tuple[int, ...]
    dtype: str
    grid: Grid | None
    first: tuple[int, tuple[int, ...], str]  # rank, slice shape, dtype: for error messages
    blocks: dict[tuple[int, ...], Block] = field(default_factory=dict)
    replicas: list[Block] = field(default_factory=list)
    stage: int = 0


def _redundancy_removed(headers: list[SafetensorsHeader]) -> bool:
    values = {h.metadata.get("remove_redundancy", "False").lower() for h in headers}
    if len(values) > 1:
        raise FormatError(
            f"{headers[0].path.parent.parent}: rank files disagree on remove_redundancy "
            f"({sorted(values)}); the checkpoint mixes files from different saves"
        )
    return values == {"true"}


def plan_source(
    checkpoint_dir: str | os.PathLike[str],
    strategy_path: str | os.PathLike[str],
    step: str | None = None,
) -> SourcePlan:
    rank_dirs = find_rank_dirs(checkpoint_dir)
    per_rank = _listed(rank_dirs)
    chosen, paths = _select(rank_dirs, per_rank, step)
    strategy = load_strategy(strategy_path)
    headers = read_headers(paths[r] for r in sorted(paths))
    plan = build_source_plan(chosen, headers, sorted(paths), strategy)
    reason = "--step" if step is not None else "the newest in every rank folder"
    plan.choice = StepChoice(tuple(_in_every_rank(per_rank)), reason)
    plan.root = Path(checkpoint_dir)
    return plan


def build_source_plan(
    step: str, headers: list[SafetensorsHeader], ranks: list[int], strategy: Strategy
) -> SourcePlan:
    world = len(ranks)
    stages = strategy.num_stages
    missing = sorted(r for r in strategy.rank_stage if r >= world)
    if missing:
        raise CoverageError(
            f"{headers[0].path.parent.parent}: no folder for {_ranks(missing)}: the strategy "
            f"files ({strategy.source}) describe ranks 0 to {max(missing)}, the checkpoint has "
            f"rank_0 to rank_{world - 1} (a rank folder not copied, or a strategy of another run?)"
        )
    if world % stages:
        raise LayoutError(
            f"{strategy.source}: {world} rank folders cannot form {stages} pipeline stages "
            "of equal size"
        )
    per_stage = world // stages
    files: list[SourceFile] = []
    collecting: dict[str, _Collecting] = {}
    scalars: dict[str, SourceParam] = {}
    optimizer_bytes = scalar_bytes = 0
    kinds: dict[int, SortedKeys] = {}
    plans: dict[tuple[int, str, int], _KeyPlan] = {}
    for rank, header in zip(ranks, headers):
        stage = strategy.stage_of_rank(rank, world)
        if rank // per_stage != stage:
            raise LayoutError(
                f"{strategy.source}: rank {rank} is in stage {stage} by its strategy file, but "
                f"with {per_stage} ranks per stage it should be in stage {rank // per_stage}"
            )
        local = rank - stage * per_stage
        files.append(SourceFile(rank, stage, header.path, header.metadata))
        # Files with identical headers share one ``tensors`` mapping: sorted out once.
        sorted_out = kinds.get(id(header.tensors))
        if sorted_out is None:
            sorted_out = kinds[id(header.tensors)] = sort_keys(header.tensors)
        optimizer_bytes += sorted_out.optimizer_bytes
        scalar_bytes += sorted_out.scalar_bytes
        for info in sorted_out.scalars:
            if info.name not in scalars:
                scalars[info.name] = whole_param(header.path, rank, info)
        for info in sorted_out.params:
            _place(collecting, plans, strategy, header.path, rank, stage, local, per_stage, info)

    paths = {f.rank: f.path for f in files}
    params = {name: _finish(name, c, strategy, per_stage, paths) for name, c in collecting.items()}
    return SourcePlan(
        step=step,
        files=tuple(files),
        params=params,
        scalars=scalars,
        remove_redundancy=_redundancy_removed(headers),
        num_stages=stages,
        grids={name: c.grid for name, c in collecting.items() if c.grid is not None},
        optimizer_bytes=optimizer_bytes,
        scalar_bytes=scalar_bytes,
        ranks=world,
    )


@dataclass
class _KeyPlan:
    """Where one stage's slices of a parameter go, for every local rank of the stage: looked up
    once per stage and parameter, so that a rank then costs two table lookups and a Block."""

    grid: Grid | None
    coords: Sequence[tuple[int, ...]]
    """Grid coordinates of each local rank's block (one entry, the origin, when unsplit)."""
    table: Callable[[tuple[int, ...]], Sequence[tuple[int, ...]]]
    """Slice shape -> each local rank's block offsets."""
    _offsets: dict[tuple[int, ...], Sequence[tuple[int, ...]]] = field(default_factory=dict)

    def offsets(self, slice_shape: tuple[int, ...]) -> Sequence[tuple[int, ...]]:
        found = self._offsets.get(slice_shape)
        if found is None:
            found = self._offsets[slice_shape] = self.table(slice_shape)
        return found


def _key_plan(
    strategy: Strategy, path: Path, stage: int, per_stage: int, info: TensorInfo
) -> _KeyPlan:
    key, ndim = info.name, len(info.shape)
    layout = strategy.layout(stage, key)
    if layout is None:
        origin = ((0,) * ndim,)
        return _KeyPlan(None, origin, lambda shape: origin)
    if layout.devices != per_stage:
        raise LayoutError(
            f"{path}: parameter {key!r}: its device matrix {list(layout.dev_matrix)} has "
            f"{layout.devices} devices, but each pipeline stage has {per_stage} ranks"
        )
    try:
        g = grid(layout, ndim)
        coords = coords_table(layout, ndim)
    except LayoutError as e:
        raise LayoutError(f"{path}: parameter {key!r} of shape {list(info.shape)}: {e}") from e
    if ndim > 2 and any(p > 1 for p in g.parts[2:]):
        raise LayoutError(f"{path}: parameter {key!r}: splits past dim 1 are not supported")
    return _KeyPlan(g, coords, lambda shape: offsets_table(layout, ndim, shape))


def _place(
    collecting: dict[str, _Collecting],
    plans: dict[tuple[int, str, int], _KeyPlan],
    strategy: Strategy,
    path: Path,
    rank: int,
    stage: int,
    local: int,
    per_stage: int,
    info: TensorInfo,
) -> None:
    key = info.name
    plan = plans.get((stage, key, len(info.shape)))
    if plan is None:
        plan = plans[(stage, key, len(info.shape))] = _key_plan(
            strategy, path, stage, per_stage, info
        )
    g = plan.grid
    c = collecting.get(key)
    if c is None:
        full = g.full_shape(info.shape) if g else info.shape
        c = collecting[key] = _Collecting(full, info.dtype, g, (rank, info.shape, info.dtype))
        c.stage = stage
    elif info.shape != c.first[1] or info.dtype != c.first[2]:
        raise LayoutError(
            f"parameter {key!r}: rank {rank} ({path}) holds a {info.dtype} slice of shape "
            f"{list(info.shape)}, but rank {c.first[0]} holds a {c.first[2]} slice of shape "
            f"{list(c.first[1])}; slices of one parameter must agree"
        )
    if g is None:
        coords = offsets = plan.coords[0]
    else:
        coords = plan.coords[local]
        offsets = plan.offsets(info.shape)[local]
    block = Block(path, rank, key, info.start, offsets, info.shape)
    if coords in c.blocks:
        c.replicas.append(block)
    else:
        c.blocks[coords] = block


def _finish(
    name: str, c: _Collecting, strategy: Strategy, per_stage: int, paths: Mapping[int, Path]
) -> SourceParam:
    layout = strategy.layout(c.stage, name)
    if layout is not None and layout.tensor_shape is not None and layout.tensor_shape != c.shape:
        raise LayoutError(
            f"parameter {name!r}: the strategy's tensor_shape {list(layout.tensor_shape)} "
            f"disagrees with the {list(c.shape)} the rank files give"
        )
    parts = c.grid.parts if c.grid else (1,) * len(c.shape)
    expected = list(itertools.product(*(range(p) for p in parts)))
    missing = [coords for coords in expected if coords not in c.blocks]
    if missing:
        assert layout is not None and c.grid is not None  # an unsplit tensor has one block
        should = holders(layout, len(c.shape))[missing[0]]
        global_ranks = [c.stage * per_stage + r for r in should]
        offsets = c.grid.offsets(missing[0], c.first[1])
        raise CoverageError(
            f"parameter {name!r}: the block at offsets {list(offsets)} (shape "
            f"{list(c.first[1])}) is in no rank file; ranks {global_ranks} should hold it, "
            f"but {paths[global_ranks[0]]} does not"
            + (f" ({len(missing)} blocks missing in all)" if len(missing) > 1 else "")
            + ". A de-duplicated save with a rank folder missing or replaced?"
        )
    if layout is not None:
        held = _global_holders(layout, len(c.shape), c.stage * per_stage)
    else:  # unsplit, no layout: held by every rank whose file has it
        held = (tuple(sorted(b.rank for b in (*c.blocks.values(), *c.replicas))),)
    return SourceParam(
        name, c.shape, c.dtype, tuple(c.blocks[k] for k in expected), tuple(c.replicas), held
    )


@lru_cache(maxsize=4096)
def _global_holders(layout: Layout, ndim: int, first: int) -> tuple[tuple[int, ...], ...]:
    """The global ranks holding each block, in grid order; shared by every parameter laid out
    alike in one stage (a large run has thousands of them)."""
    by_block = holders(layout, ndim)
    return tuple(tuple(first + r for r in by_block[coords]) for coords in sorted(by_block))
