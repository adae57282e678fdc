"""Strategy files: how every parameter of every pipeline stage is laid out over the devices.

Reads protobuf (``.ckpt``) and JSON files, one per rank or merged over stages (names prefixed
``"{stage}-"``), in both the Layout form MindSpore Transformers writes (one TensorMap per tensor
dimension) and the older flat form (``docs/legacy-format.md#strategy-files``). The result is a
per-stage map of ``Layout`` values; what a layout means for a rank's slice is
``ms2hf.io.placement``'s job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ms2hf.errors import FormatError, LayoutError
from ms2hf.io.read_ahead import read_in_order
from ms2hf.io.sources.strategy_proto import ParallelStrategyMap
from ms2hf.io.sources.training_keys import KeyKind, key_kind

_RANK_FILE = re.compile(r"(?:.*_)?rank_(\d+)\.(?:ckpt|json)$")
_MERGED_NAME = re.compile(r"^(\d+)-(.+)$")
NOT_SPLIT = -1


@dataclass(frozen=True)
class Layout:
    """One parameter's layout as stored: the device matrix and what splits each tensor dim."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]
    """Raw TensorMap entries, trailing empty ones dropped."""
    opt_shard_step: int = 0
    opt_shard_size: int = 0
    tensor_shape: tuple[int, ...] | None = None
    """The full shape, which only JSON files carry; used as a cross-check."""

    @property
    def devices(self) -> int:
        n = 1
        for d in self.dev_matrix:
            n *= d
        return n

    @property
    def optimizer_sharded(self) -> bool:
        return self.opt_shard_step != 0 and self.opt_shard_size != 0

    def dim_axes(self, ndim: int) -> tuple[tuple[int, ...], ...] | None:
        """The dev axes (counted from the right) that split each of ``ndim`` tensor dims.

        Layout form stores one entry per dim, flat form one entry listing an axis per dim; the
        two only differ in meaning for tensors of two or more dims, so the slice's rank decides.
        Returns None when the map fits neither form.
        """
        entries = self.tensor_map
        if ndim == 0:
            return () if all(a == NOT_SPLIT for e in entries for a in e) else None
        if len(entries) == ndim:
            return tuple(tuple(a for a in e if a != NOT_SPLIT) for e in entries)
        if len(entries) == 1 and len(entries[0]) == ndim:
            return tuple(() if a == NOT_SPLIT else (a,) for a in entries[0])
        return None


@dataclass(frozen=True)
class StrategyFile:
    """The layouts found in one file, by pipeline stage."""

    path: Path
    stage: int | None
    """The stage of a per-rank file; None for a merged file, which covers several."""
    layouts: Mapping[int, Mapping[str, Layout]]


@dataclass(frozen=True)
class Strategy:
    """Every stage's layouts, and which stage each rank with its own strategy file is in."""

    layouts: Mapping[int, Mapping[str, Layout]]
    rank_stage: Mapping[int, int]
    source: Path

    @property
    def num_stages(self) -> int:
        return len(self.layouts)

    def layout(self, stage: int, name: str) -> Layout | None:
        """A parameter's layout; one present in several stages takes the lowest stage's."""
        return self._first_layouts.get(name)

    @cached_property
    def _first_layouts(self) -> dict[str, Layout]:
        first: dict[str, Layout] = {}
        for s in sorted(self.layouts, reverse=True):
            first.update(self.layouts[s])
        return first

    def stage_of_rank(self, rank: int, world: int) -> int:
        stage = self.rank_stage.get(rank)
        if stage is not None:
            return stage
        per_stage = world // self.num_stages
        if per_stage == 0 or world % self.num_stages:
            raise LayoutError(
                f"{self.source}: {world} ranks cannot be split into {self.num_stages} "
                "pipeline stages of equal size"
            )
        return rank // per_stage


def _ints(values: Iterable[object], path: Path, name: str, what: str) -> tuple[int, ...]:
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise FormatError(f"{path}: parameter {name!r}: {what} holds {v!r}, not an integer")
        out.append(v)
    return tuple(out)


def stored_tensor_map(entries: Sequence[tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
    """A tensor map as a layout keeps it: trailing empty entries (dims the file leaves
    unmapped) dropped, so that equal layouts compare equal however they were written."""
    end = len(entries)
    while end and not entries[end - 1]:
        end -= 1
    return tuple(entries[:end])


def _make_layout(
    path: Path,
    name: str,
    dev_matrix: list[tuple[int, ...]],
    tensor_map: Sequence[tuple[int, ...]],
    split_shape: list[tuple[int, ...]],
    step: int,
    size: int,
    tensor_shape: tuple[int, ...] | None = None,
) -> Layout:
    if len(dev_matrix) != 1 or not dev_matrix[0] or any(d <= 0 for d in dev_matrix[0]):
        raise FormatError(
            f"{path}: parameter {name!r}: expected one device matrix of positive sizes, "
            f"found {[list(d) for d in dev_matrix]}"
        )
    if any(split_shape):
        raise LayoutError(
            f"{path}: parameter {name!r}: param_split_shape {[list(s) for s in split_shape]} is "
            "set (uneven splits); ms2hf does not guess how to place such slices"
        )
    tensor_map = stored_tensor_map(tensor_map)
    n = len(dev_matrix[0])
    for entry in tensor_map:
        for axis in entry:
            if axis != NOT_SPLIT and not 0 <= axis < n:
                raise FormatError(
                    f"{path}: parameter {name!r}: tensor_map axis {axis} is outside the "
                    f"{n}-axis device matrix {list(dev_matrix[0])}"
                )
    return Layout(dev_matrix[0], tensor_map, step, size, tensor_shape)


def _split_stage(name: str, stage: int | None, path: Path) -> tuple[int, str]:
    """Per-rank files name parameters plainly; merged files prefix them with their stage."""
    if stage is not None:
        return stage, name
    m = _MERGED_NAME.match(name)
    if m is None:
        raise FormatError(
            f"{path}: parameter {name!r} has no stage prefix in a file without a stage "
            "(expected a per-rank file with parallel_strategy_item, or a merged file with "
            "'<stage>-<name>' keys)"
        )
    return int(m.group(1)), m.group(2)


def _is_merged(names: Iterable[str]) -> bool:
    names = list(names)
    return bool(names) and all(_MERGED_NAME.match(n) for n in names)


def _parse_protobuf(path: Path, data: bytes) -> StrategyFile:
    msg = ParallelStrategyMap()
    try:
        msg.ParseFromString(data)
    except Exception as e:  # the runtime raises DecodeError, or others on hostile bytes
        raise FormatError(
            f"{path}: neither a protobuf strategy file nor JSON ({type(e).__name__}: {e})"
        ) from e
    if not msg.parallel_layout_item:
        raise FormatError(
            f"{path}: holds no parameter layouts (an empty strategy file, or not a strategy file)"
        )
    names = [item.param_name for item in msg.parallel_layout_item]
    if not all(isinstance(n, str) for n in names):  # proto2 hands back bytes that are not UTF-8
        raise FormatError(f"{path}: a parameter name is not valid UTF-8 (a damaged strategy file?)")
    stage = None
    if not _is_merged(names):
        stage = (
            msg.parallel_strategy_item[0].parallel_strategys.stage
            if msg.parallel_strategy_item
            else 0
        )
    layouts: dict[int, dict[str, Layout]] = {}
    for item in msg.parallel_layout_item:
        s, name = _split_stage(item.param_name, stage, path)
        if key_kind(name) is KeyKind.OPTIMIZER:
            continue
        lay = item.parallel_layouts
        layouts.setdefault(s, {})[name] = _make_layout(
            path,
            name,
            [tuple(d.dim) for d in lay.dev_matrix],
            [tuple(t.dim) for t in lay.tensor_map],
            [tuple(p.dim) for p in lay.param_split_shape],
            lay.opt_weight_shard_step,
            lay.opt_weight_shard_size,
        )
    return StrategyFile(path, stage, layouts)


def _parse_json(path: Path, data: bytes) -> StrategyFile:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: neither a protobuf strategy file nor valid JSON: {e}") from e
    items = doc.get("parallel_layout_item") if isinstance(doc, dict) else None
    if not isinstance(items, dict) or not items:
        raise FormatError(f"{path}: JSON strategy without a 'parallel_layout_item' object")
    stage = None
    if not _is_merged(items):
        strategies = doc.get("parallel_strategy_item") or {}
        first: object = next(iter(strategies.values()), {}) if isinstance(strategies, dict) else {}
        stage = first.get("stage", 0) if isinstance(first, dict) else 0
        if not isinstance(stage, int):
            raise FormatError(f"{path}: stage {stage!r} is not an integer")
    layouts: dict[int, dict[str, Layout]] = {}
    for raw_name, raw in items.items():
        s, name = _split_stage(raw_name, stage, path)
        if key_kind(name) is KeyKind.OPTIMIZER:
            continue
        if not isinstance(raw, dict):
            raise FormatError(f"{path}: parameter {name!r}: layout is not an object")
        try:
            tensor_map = raw.get("tensor_map", [])
            entries = (
                [
                    tuple(_ints(e if isinstance(e, list) else [e], path, name, "tensor_map"))
                    for e in tensor_map
                ]
                if any(isinstance(e, list) for e in tensor_map)
                else [_ints(tensor_map, path, name, "tensor_map")]
            )
            shape = raw.get("tensor_shape")
            layouts.setdefault(s, {})[name] = _make_layout(
                path,
                name,
                [_ints(raw.get("dev_matrix", []), path, name, "dev_matrix")],
                entries,
                [_ints(raw.get("param_split_shape", []), path, name, "param_split_shape")],
                int(raw.get("opt_weight_shard_step", 0)),
                int(raw.get("opt_weight_shard_size", 0)),
                None if shape is None else _ints(shape, path, name, "tensor_shape"),
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise FormatError(f"{path}: parameter {name!r}: malformed layout: {e}") from e
    return StrategyFile(path, stage, layouts)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e


def _parse_strategy(path: Path, data: bytes) -> StrategyFile:
    if data.lstrip()[:1] == b"{":
        return _parse_json(path, data)
    return _parse_protobuf(path, data)


def _suffix(name: str) -> str:
    """``Path(name).suffix``, without making a path."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def load_strategy(path: str | os.PathLike[str]) -> Strategy:
    """Read a strategy folder (per-rank files, or merged ones) or a single merged file."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: strategy path does not exist")
    if path.is_dir():
        with os.scandir(path) as entries:  # is_file from the listing: no stat per file
            files = sorted(
                path / e.name
                for e in entries
                if _suffix(e.name) in (".ckpt", ".json") and e.is_file()
            )
        if not files:
            raise FormatError(f"{path}: strategy folder holds no .ckpt or .json strategy files")
    else:
        files = [path]

    # Ranks of one stage write identical bytes: parse each distinct content once.
    parsed: dict[bytes, StrategyFile] = {}
    layouts: dict[int, dict[str, Layout]] = {}
    rank_stage: dict[int, int] = {}
    for file, key in zip(files, read_in_order(files, _read_bytes)):
        sf = parsed.get(key) or _parse_strategy(file, key)
        parsed[key] = sf
        if sf.stage is not None:
            m = _RANK_FILE.match(file.name)
            if m is None:
                raise FormatError(
                    f"{file}: a per-rank strategy file whose name does not end in "
                    "'rank_<N>.ckpt' or 'rank_<N>.json'"
                )
            rank_stage[int(m.group(1))] = sf.stage
        for stage, params in sf.layouts.items():
            layouts.setdefault(stage, {}).update(params)

    stages = sorted(layouts)
    if stages != list(range(len(stages))):
        raise LayoutError(
            f"{path}: pipeline stages found are {stages}; expected 0..{len(stages) - 1} "
            "(strategy files from different runs mixed, or some stages missing)"
        )
    return Strategy(layouts, rank_stage, path)
