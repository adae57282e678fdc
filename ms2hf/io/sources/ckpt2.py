"""Checkpoint 2.0 (mindformers' ``use_legacy_format: False``): one ``iteration_XXXXXXXX/`` folder
as a source plan, from ``metadata.json`` (``ms2hf.io.sources.ckpt2_metadata``) and the
``-model-`` files' headers alone (``docs/checkpoint2.md``).

``metadata.json`` cuts every tensor into a grid (``axis_fragmentations``) and numbers the cells
row-major; ``storage_data`` says which file holds each cell (``slice id``). So placement is
arithmetic on the metadata, with no layout math: the cell's coordinates times the slice shape.
Optimizer states are told apart by their files' names and never opened, not even their headers:
a copy of the ``-model-`` files alone converts. Which iteration is read is
``ms2hf.io.sources.iterations``'.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ms2hf.errors import FormatError, LayoutError
from ms2hf.io.placement import Grid, unravel
from ms2hf.io.safetensors_reader import SafetensorsHeader, read_headers
from ms2hf.io.sources.ckpt2_metadata import (
    COMMON,
    METADATA,
    MODEL_FILE,
    MS_DTYPES,
    ONE_CARD_FILE,
    OPTIMIZER,
    Entry,
    Metadata,
    Record,
    load_json,
)
from ms2hf.io.sources.iterations import iteration_number
from ms2hf.io.sources.plan import (
    CKPT2,
    Block,
    SourceFile,
    SourceParam,
    SourcePlan,
    StepChoice,
    whole_param,
)
from ms2hf.io.sources.training_keys import sort_keys

log = logging.getLogger("ms2hf")


class Headers:
    """The ``-model-`` files' headers: every file the records name, read at once a few threads
    ahead, each distinct header parsed once (``read_headers``); a file that is not there is
    reported when a parameter's slice needs it."""

    def __init__(self, folder: Path, meta: Metadata) -> None:
        self.folder = folder
        self.meta = meta
        named = {r.file for slices in meta.records.values() for rs in slices.values() for r in rs}
        with os.scandir(folder) as entries:
            present = sorted(e.name for e in entries if e.name in named and e.is_file())
        self.headers: dict[str, SafetensorsHeader] = dict(
            zip(present, read_headers(folder / name for name in present))
        )

    def get(self, file: str, name: str, sid: int) -> SafetensorsHeader:
        header = self.headers.get(file)
        if header is None:
            path = self.folder / file
            if not path.is_file():
                self.meta.fail(f"parameter {name!r} slice {sid}: file {file} is missing")
            header = self.headers[file] = SafetensorsHeader(path)
        return header


def _param(
    name: str, entry: Entry, records: Mapping[int, list[Record]], headers: Headers
) -> SourceParam:
    """One parameter's blocks: each slice from its lowest rank's record (the rest replicas), or,
    when the files hold the whole parameter (a normal save's integrated save, doc section 7),
    one whole block and the other files' whole copies as replicas."""
    whole = entry.shape != entry.local
    forms: dict[str, str] = {}  # "slice"/"whole" -> a file holding it that way
    blocks: list[Block] = []
    replicas: list[Block] = []
    holders: list[tuple[int, ...]] = []
    whole_copies: dict[str, Block] = {}
    all_holders: set[int] = set()
    for sid in entry.slices:
        recs = sorted(records[sid], key=lambda r: (r.rank is None, r.rank or 0, r.file))
        coords = unravel(sid, entry.grid)
        offsets = tuple(c * n for c, n in zip(coords, entry.local))
        group = tuple(recs[0].group or sorted({r.rank for r in recs if r.rank is not None}))
        all_holders.update(group)
        placed: list[Block] = []
        for rec in recs:
            header = headers.get(rec.file, name, sid)
            info = header.tensors.get(name)
            if info is None:
                raise FormatError(
                    f"{header.path}: holds no tensor {name!r} ({METADATA} stores slice {sid} "
                    "of it there)"
                )
            if info.dtype != entry.dtype:
                raise FormatError(
                    f"{header.path}: parameter {name!r} slice {sid} is stored as {info.dtype}, "
                    f"{METADATA} says {MS_DTYPES[entry.dtype]}"
                )
            if info.shape == entry.local:
                form = "slice"
            elif whole and info.shape == entry.shape:
                form = "whole"
            else:
                raise LayoutError(
                    f"{header.path}: parameter {name!r} slice {sid} has shape "
                    f"{list(info.shape)}, expected the slice {list(entry.local)} or the whole "
                    f"{list(entry.shape)}"
                )
            forms.setdefault(form, rec.file)
            if len(forms) > 1:
                other = "slice" if form == "whole" else "whole"
                raise LayoutError(
                    f"{header.path}: parameter {name!r}: holds the {form} {list(info.shape)}, "
                    f"but {forms[other]} holds the {other}; one parameter is stored one way"
                )
            rank = rec.rank if rec.rank is not None else _file_rank(rec.file)
            if form == "whole":
                if rec.file not in whole_copies:
                    zero = (0,) * len(entry.shape)
                    whole_copies[rec.file] = Block(
                        header.path, rank, name, info.start, zero, entry.shape
                    )
            else:
                placed.append(Block(header.path, rank, name, info.start, offsets, info.shape))
        if placed:
            blocks.append(placed[0])
            replicas.extend(placed[1:])
            holders.append(group)
    if whole_copies:
        first, *rest = whole_copies.values()
        blocks, replicas, holders = [first], rest, [tuple(sorted(all_holders))]
    return SourceParam(
        name, entry.shape, entry.dtype, tuple(blocks), tuple(replicas), tuple(holders)
    )


def _file_rank(file: str) -> int:
    m = MODEL_FILE.fullmatch(file)
    return int(m.group(1)) if m else 0


def _read_common(folder: Path, iteration: int | None) -> dict[str, Any]:
    """``common.json``: the run's counters (what resume reads). Not needed for the weights, so a
    missing or unreadable one is a warning."""
    path = folder / COMMON
    if not path.is_file():
        return {}
    try:
        doc = load_json(path)
    except FormatError as e:
        log.warning("warning: %s; its counters are not shown", e)
        return {}
    if not isinstance(doc, dict):
        log.warning("warning: %s: not a JSON object; its counters are not shown", path)
        return {}
    step = doc.get("step_num")
    if iteration is not None and step is not None and step != iteration:
        log.warning(
            "warning: %s says step_num %r, but the folder is iteration %d (renamed, or files "
            "of two saves?)",
            path,
            step,
            iteration,
        )
    return doc


def plan_iteration(folder: Path, choice: StepChoice | None = None) -> SourcePlan:
    """Plan reading one iteration folder: every model parameter's blocks, from ``metadata.json``
    and the ``-model-`` files' headers; optimizer files are never opened. A large save makes
    millions of small objects: the commands plan with the cyclic collector paused
    (``ms2hf.pipeline.engine.memory.paused_gc``)."""
    if not (folder / METADATA).is_file():
        iteration = iteration_number(folder)
        step = str(iteration) if iteration is not None else folder.name
        return _plan_one_card(folder, step, choice, _read_common(folder, iteration))
    meta = Metadata(folder)
    return plan_from(meta, Headers(folder, meta), choice)


def plan_from(meta: Metadata, headers: Headers, choice: StepChoice | None = None) -> SourcePlan:
    """The plan of an iteration folder from its metadata and its ``-model-`` files' headers."""
    folder = meta.path.parent
    iteration = iteration_number(folder)
    step = str(iteration) if iteration is not None else folder.name
    counters = _read_common(folder, iteration)
    params: dict[str, SourceParam] = {}
    grids: dict[str, Grid] = {}
    stage_ranks: dict[str, tuple[int, ...]] = {}
    optimizer_bytes = 0
    for name in meta.entries:
        if meta.kind(name) == OPTIMIZER:
            optimizer_bytes += meta.optimizer_bytes(name)
            continue
        entry = meta.entry(name)
        params[name] = _param(name, entry, meta.slice_records(name, entry), headers)
        grids[name] = Grid(entry.grid, ((),) * len(entry.grid), entry.opt_chunks)
        stage_ranks[name] = entry.rank_list or params[name].holders[0]
    if not params:
        meta.fail("describes no model parameter (no record names a '-model-' file)")
    return _assemble(
        meta, headers, params, grids, stage_ranks, optimizer_bytes, step, choice, counters
    )


def _assemble(
    meta: Metadata,
    headers: Headers,
    params: dict[str, SourceParam],
    grids: dict[str, Grid],
    stage_ranks: Mapping[str, tuple[int, ...]],
    optimizer_bytes: int,
    step: str,
    choice: StepChoice | None,
    counters: dict[str, Any],
) -> SourcePlan:
    """The run's shape (ranks, stages) from the layouts' rank lists and the records."""
    seen = {r for ranks in stage_ranks.values() for r in ranks}
    seen |= {r for p in params.values() for group in p.holders for r in group}
    seen |= {b.rank for p in params.values() for b in (*p.blocks, *p.replicas)}
    world = max(seen) + 1
    per_stage = max(len(ranks) for ranks in stage_ranks.values()) or world
    stages = world // per_stage if world % per_stage == 0 else 1
    file_rank: dict[str, int] = {}
    for p in params.values():
        for b in (*p.blocks, *p.replicas):
            file_rank.setdefault(b.path.name, b.rank)
    files = tuple(
        SourceFile(file_rank[f], file_rank[f] // per_stage if stages > 1 else 0, h.path, h.metadata)
        for f, h in sorted(headers.headers.items())
    )
    copies = [len(p.blocks) + len(p.replicas) for p in params.values()]
    replicated = any(len(group) > 1 for p in params.values() for group in p.holders)
    return SourcePlan(
        step=step,
        files=files,
        params=params,
        scalars={},
        remove_redundancy=replicated
        and all(n == len(p.blocks) for n, p in zip(copies, params.values())),
        num_stages=stages,
        grids=grids,
        optimizer_bytes=optimizer_bytes,
        source_format=CKPT2,
        root=meta.path.parent,
        ranks=world,
        choice=choice,
        counters=counters,
    )


def _plan_one_card(
    folder: Path, step: str, choice: StepChoice | None, counters: dict[str, Any]
) -> SourcePlan:
    """A one-card save has no ``metadata.json``: its single ``-model-`` file holds every tensor
    whole (mindformers' own loader reads it so). Any other folder without one is refused."""
    models = sorted(p for p in folder.iterdir() if MODEL_FILE.fullmatch(p.name))
    if len(models) != 1 or not ONE_CARD_FILE.fullmatch(models[0].name):
        found = ", ".join(p.name for p in models[:4]) or "no '-model-' file"
        raise FormatError(
            f"{folder}: has no {METADATA} (only a one-card save, whose one file is "
            f"'*-model-0000000-0000001.safetensors', may lack it; found {found}); a save that "
            "died before finishing?"
        )
    header = SafetensorsHeader(models[0])
    log.info("%s: a one-card save (no %s): every tensor taken whole", folder, METADATA)
    keys = sort_keys(header.tensors)
    scalars = {info.name: whole_param(header.path, 0, info) for info in keys.scalars}
    params = {}
    for info in keys.params:
        param = whole_param(header.path, 0, info)
        params[info.name] = SourceParam(
            param.name, param.shape, param.dtype, param.blocks, holders=((0,),)
        )
    return SourcePlan(
        step=step,
        files=(SourceFile(0, 0, header.path, header.metadata),),
        params=params,
        scalars=scalars,
        remove_redundancy=False,
        num_stages=1,
        optimizer_bytes=keys.optimizer_bytes,
        scalar_bytes=keys.scalar_bytes,
        source_format=CKPT2,
        root=folder,
        ranks=1,
        choice=choice,
        counters=counters,
    )
