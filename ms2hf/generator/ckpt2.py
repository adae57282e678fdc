"""A generated run saved as Checkpoint 2.0, as mindformers 2.1.0 writes it
(``docs/checkpoint2.md#11-writing-one-for-test-generators``): the same file names,
``metadata.json`` keys, entry and record order and JSON form as the genuine fixtures.

Which block each rank holds is ``ms2hf.io.placement``'s (as for the legacy format): a block's
row-major index in the grid is its slice id, and the layout ``metadata.json`` shows is the
strategy's with the optimizer's axes folded into dim 0, which numbers the blocks the same way.
What is decided here is what the save decides: the order things are reported in, which rank
writes each slice (every holder in a normal save, the balanced plan in a de-duplicated one),
whole tensors where MindSpore's integrated save gathers them, and the file names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ms2hf.errors import Ms2hfError
from ms2hf.generator.config import GeneratorConfig
from ms2hf.generator.files import ADAM_STATE, FileSpec, Slot, training_scalars
from ms2hf.generator.layouts import PlacedParam
from ms2hf.io.placement import block_coords, grid
from ms2hf.io.safetensors_writer import TensorEntry
from ms2hf.io.sources.ckpt2_metadata import COMMON, METADATA, MS_DTYPES
from ms2hf.io.sources.iterations import TRACKER
from ms2hf.io.sources.strategy import NOT_SPLIT

FILE_METADATA = {"format": "ms"}
BITS = {"Float32": 32, "BFloat16": 16, "Float16": 16, "Int32": 32, "Int64": 64}
"""mindformers' sizes for balancing a de-duplicated save (anything else counts 16)."""
OPTIMIZER_SCALARS = ("learning_rate", "global_step")
"""What a normal save's optimizer files hold beyond the states, undescribed by the metadata."""
RUN = {"epoch_num": 1, "loss_scale": 1024.0, "global_batch_size": 8}
"""``common.json`` values of the genuine fixtures' run (the step is the iteration's)."""


def iteration_name(step: int) -> str:
    return f"iteration_{step:08d}"


def file_name(prefix: str, kind: str, index: int, count: int) -> str:
    stem = f"{kind}-{index:07d}-{count:07d}.safetensors"
    return f"{prefix}-{stem}" if prefix else stem


@dataclass(frozen=True)
class _Item:
    """One tensor a rank of a stage reports: a parameter or one of its Adam states."""

    param: PlacedParam
    state: str
    dtype: str
    slice_ids: tuple[int, ...]
    """By local rank."""
    keys: dict[int, str]
    """``storage_data`` key of each slice id."""

    @property
    def name(self) -> str:
        return self.state + self.param.spec.name

    @property
    def local_shape(self) -> tuple[int, ...]:
        return self.param.slice_shape


def _tensor_map(p: PlacedParam) -> list[Any]:
    """The layout's tensor map as ``Layout.to_dict`` writes it: one entry per dim (an axis, -1,
    or a list of axes), optimizer sharding folded into dim 0 as the device axes the map leaves
    unused, left to right (``docs/checkpoint2.md#33-layout``)."""
    ndim = len(p.spec.shape)
    entries = [[a for a in e if a != NOT_SPLIT] for e in p.spec.tensor_map[:ndim]]
    folded = p.layout.optimizer_sharded and ndim > 0
    if folded:
        n = len(p.spec.dev_matrix)
        used = {a for e in entries for a in e}
        unused = [n - 1 - i for i in range(n) if n - 1 - i not in used]
        chunks = grid(p.layout, ndim).opt_chunks
        if math.prod(p.spec.dev_matrix[n - 1 - a] for a in unused) != chunks:
            raise Ms2hfError(
                f"parameter {p.spec.name!r}: optimizer shards of {chunks} smaller than its "
                "replica group: how mindformers writes that layout in Checkpoint 2.0 is not "
                "known (docs/checkpoint2.md#13-open-questions); use opt_shard -1"
            )
        entries[0] += unused
    return [
        e if (folded and i == 0) or len(e) > 1 else (e[0] if e else NOT_SPLIT)
        for i, e in enumerate(entries)
    ]


def _slice_ids(p: PlacedParam, ranks: int) -> tuple[int, ...]:
    """Each local rank's block as its row-major index in the grid."""
    ndim = len(p.spec.shape)
    parts = grid(p.layout, ndim).parts
    out = []
    for local in range(ranks):
        sid = 0
        for c, n in zip(block_coords(p.layout, ndim, local), parts):
            sid = sid * n + c
        out.append(sid)
    return tuple(out)


def _replica_ids(slice_ids: Sequence[int]) -> list[int]:
    seen: dict[int, int] = {}
    out = []
    for sid in slice_ids:
        out.append(seen.get(sid, 0))
        seen[sid] = out[-1] + 1
    return out


def _stage_items(params: Sequence[PlacedParam], config: GeneratorConfig) -> list[_Item]:
    """What every rank of a stage reports, in order: its parameters sorted by name, each
    followed by its ``adam_m.`` and ``adam_v.`` states."""
    items = []
    for p in sorted(params, key=lambda p: p.spec.name):
        sids = _slice_ids(p, config.devices_per_stage)
        for state in p.saved_prefixes:
            name = state + p.spec.name
            dtype = ADAM_STATE if state else p.spec.dtype or config.source_dtype
            keys = {sid: str((name, (sid,))) for sid in set(sids)}
            items.append(_Item(p, state, dtype, sids, keys))
    return items


def _entry(item: _Item, stage: int, per_stage: int) -> dict[str, Any]:
    p = item.param
    ndim = len(p.spec.shape)
    return {
        "properties": {
            "dtype": MS_DTYPES[item.dtype],
            "replica_id": _replica_ids(item.slice_ids),
            "allow_shape_mismatch": False,
            "allow_to_save": True,
        },
        "global_shape": list(p.spec.shape),
        "axis_fragmentations": list(grid(p.layout, ndim).parts),
        "layout": {
            "device_matrix": list(p.spec.dev_matrix),
            "tensor_map": _tensor_map(p),
            "interleaved_parallel": False,
            "alias_name": [chr(ord("a") + i) for i in range(len(p.spec.dev_matrix))],
            "rank_list": list(range(stage * per_stage, (stage + 1) * per_stage)),
        },
        "chunk": [],
    }


@dataclass(frozen=True)
class Save:
    """A planned Checkpoint 2.0 save: its files and where each parameter's pieces go, then
    (``finish``, once the files are written) ``common.json``, ``metadata.json`` and the tracker,
    in the order mindformers writes them."""

    folder: Path
    files: tuple[FileSpec, ...]
    slots: dict[str, list[Slot]]
    metadata: dict[str, Any] | None
    """None for a one-card save, which writes none."""
    common: dict[str, Any]
    step: int

    def finish(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.common, ensure_ascii=False, indent=4)
        (self.folder / COMMON).write_text(text, encoding="utf-8")
        if self.metadata is not None:
            temporary = self.folder / f".{METADATA}.partial"
            text = json.dumps(self.metadata, ensure_ascii=False, separators=(",", ":"))
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, self.folder / METADATA)
        (self.folder.parent / TRACKER).write_text(str(self.step), encoding="utf-8")


class _Planner:
    """The files, records and slots of one save."""

    def __init__(self, folder: Path, config: GeneratorConfig) -> None:
        self.folder = folder
        self.config = config
        self.files: list[FileSpec] = []
        self.slots: dict[str, list[Slot]] = {}
        self.storage: dict[str, list[dict[str, Any]]] = {}

    def add_file(self, name: str, pieces: Sequence[tuple[_Item, int]], whole: bool) -> None:
        """A file holding ``pieces`` (each an item and a local rank holding its slice), or their
        parameters whole; a normal save's optimizer file also holds the two scalars the metadata
        leaves out."""
        entries = []
        for item, local in pieces:
            shape = item.param.spec.shape if whole else item.local_shape
            entries.append(TensorEntry(item.name, item.dtype, shape))
            region = tuple(slice(None) for _ in shape) if whole else item.param.region(local)
            slot = Slot(len(self.files), item.state, region)
            self.slots.setdefault(item.param.spec.name, []).append(slot)
        constants = {}
        if "-opt-" in f"-{name}" and not self.config.remove_redundancy:
            scalars = training_scalars(self.config.step)
            for scalar in OPTIMIZER_SCALARS:
                tag, value = scalars[scalar]
                entries.append(TensorEntry(scalar, tag, value.shape))
                constants[scalar] = value
        self.files.append(FileSpec(self.folder / name, tuple(entries), FILE_METADATA, constants))

    def record(self, key: str, name: str, rank: int, group: list[int]) -> None:
        rec = {"file_name": name, "storage_rank": rank, "rank_group": group}
        self.storage.setdefault(key, []).append(rec)


KINDS = (("model", False), ("opt", True))
"""File kinds, and whether they hold optimizer states."""


def _normal(
    planner: _Planner,
    items: Sequence[Sequence[_Item]],
    holders: dict[str, list[int]],
    whole: bool,
) -> None:
    """Every rank writes a model file and an optimizer file of all it holds
    (``docs/checkpoint2.md#6-normal-saves-remove_redundancy-false``)."""
    config = planner.config
    per_stage, world = config.devices_per_stage, config.world
    for rank in range(world):
        stage, local = divmod(rank, per_stage)
        names = {}
        for kind, states in KINDS:
            names[states] = file_name(config.prefix, kind, rank, world)
            pieces = [(i, local) for i in items[stage] if bool(i.state) == states]
            planner.add_file(names[states], pieces, whole)
        for item in items[stage]:
            key = item.keys[item.slice_ids[local]]
            planner.record(key, names[bool(item.state)], rank, holders[key])


def _bits(item: _Item) -> int:
    return math.prod(item.local_shape) * BITS.get(MS_DTYPES[item.dtype], 16)


def _balanced(
    planner: _Planner, items: Sequence[Sequence[_Item]], holders: dict[str, list[int]]
) -> None:
    """Each slice once, by mindformers' balanced plan, model and optimizer sides apart
    (``docs/checkpoint2.md#8-de-duplicated-saves-remove_redundancy-true-and-the-balanced-plan``):
    fewest holders first, then biggest, then by key string; each to its least loaded holder."""
    config = planner.config
    per_stage = config.devices_per_stage
    for kind, states in KINDS:
        shards: dict[str, tuple[_Item, int]] = {}
        for rank in range(config.world):
            stage, local = divmod(rank, per_stage)
            for item in items[stage]:
                if bool(item.state) == states:
                    shards.setdefault(item.keys[item.slice_ids[local]], (item, local))
        size = {key: _bits(item) for key, (item, _) in shards.items()}
        load = [0] * config.world
        assigned: dict[int, list[str]] = {}
        for key in sorted(shards, key=lambda k: (len(holders[k]), -size[k], k)):
            rank = min(holders[key], key=load.__getitem__)
            assigned.setdefault(rank, []).append(key)
            load[rank] += size[key]
        for index, rank in enumerate(sorted(assigned)):
            name = file_name(config.prefix, kind, index, len(assigned))
            planner.add_file(name, [shards[k] for k in assigned[rank]], whole=False)
            for key in assigned[rank]:
                planner.record(key, name, rank, holders[key])


def plan_save(
    checkpoint_dir: Path, stages: Sequence[Sequence[PlacedParam]], config: GeneratorConfig
) -> Save:
    """The save of ``config.step`` into ``checkpoint_dir``. A normal save without pipeline
    parallelism holds whole parameters (MindSpore's integrated save gathers them,
    ``docs/checkpoint2.md#7-whole-tensors-in-a-normal-save``); one card writes no metadata."""
    folder = checkpoint_dir / iteration_name(config.step)
    per_stage = config.devices_per_stage
    items = [_stage_items(params, config) for params in stages]
    common = {
        "epoch_num": RUN["epoch_num"],
        "step_num": config.step,
        "global_step": config.step,
        "loss_scale": RUN["loss_scale"],
        "global_batch_size": RUN["global_batch_size"],
        "consumed_samples": None,
        "ckpt_status": None,
    }
    entries: dict[str, dict[str, Any]] = {}
    seen: dict[str, set[int]] = {}
    holders: dict[str, list[int]] = {}
    for rank in range(config.world):
        stage, local = divmod(rank, per_stage)
        for item in items[stage]:
            sid = item.slice_ids[local]
            holders.setdefault(item.keys[sid], []).append(rank)
            if item.name not in entries:
                entries[item.name] = _entry(item, stage, per_stage)
                seen[item.name] = set()
            if sid not in seen[item.name]:
                seen[item.name].add(sid)
                chunk = {"global_offset": [sid], "local_shape": list(item.local_shape)}
                entries[item.name]["chunk"].append(chunk)
    planner = _Planner(folder, config)
    if config.world == 1 or not config.remove_redundancy:
        _normal(planner, items, holders, whole=config.pp == 1)
    else:
        _balanced(planner, items, holders)
    metadata = None
    if config.world > 1:
        metadata = {"state_dict_metadata": entries, "storage_data": planner.storage}
    return Save(folder, tuple(planner.files), planner.slots, metadata, common, config.step)
