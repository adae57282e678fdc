"""Reassemble every full MindSpore parameter of a legacy training output (SPEC sections 1-3).

Input: ``checkpoint/rank_N/*.safetensors`` (one file per rank) and
``strategy/ckpt_strategy_rank_N.ckpt`` (one protobuf strategy file per rank). Output: every model
parameter as one full numpy array, in its stored dtype.

Why it is written this way: this is the reference that ms2hf's conversions and generator are
checked against, so it must not share their mistakes. It decodes the protobuf wire format by
hand from the field numbers of SPEC section 2 (no shared schema), places every slice of every
rank by the words of SPEC section 3 (coordinates, replica group, ``pos % eff``), and checks
coverage and replica agreement element by element with a mask. Nothing is streamed or clever:
whole tensors are held in memory, so it is for small test checkpoints only.

Simplifications, on purpose: per-rank ``.ckpt`` strategy files only (no JSON, no merged
files), and one checkpoint per rank folder (no step selection).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.oracle.files import read_tensors

SCALARS = frozenset(
    {
        "global_step",
        "scale_sense",
        "learning_rate",
        "epoch_num",
        "step_num",
        "loss_scale",
        "global_batch_size",
        "current_iterator_step",
        "last_overflow_iterator_step",
    }
)
"""Training counters saved in every rank file (SPEC section 1): not model parameters."""
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.")
"""Optimizer states and gradient accumulators: their layouts and values are ignored."""


class OracleError(Exception):
    """The training output breaks a rule of SPEC sections 1-3."""


# --- protobuf wire format ---------------------------------------------------------------------

Fields = dict[int, list[int | bytes]]
"""A decoded message: field number -> its values (varints as ints, length-delimited as bytes)."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """A base-128 varint starting at ``buf[i]``: its value and the index after it."""
    value = shift = 0
    while True:
        if i >= len(buf):
            raise OracleError("truncated varint in a strategy file")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _message(buf: bytes) -> Fields:
    """Split a protobuf message into its fields. Only wire types 0 (varint) and 2 (bytes) occur
    in strategy files; anything else means the bytes are not one."""
    out: Fields = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        else:
            raise OracleError(f"unexpected protobuf wire type {wire} (field {number})")
        out.setdefault(number, []).append(value)
    return out


def _ints(fields: Fields, number: int, signed: bool) -> list[int]:
    """A repeated integer field, written unpacked (one varint each) or packed (one bytes value
    of concatenated varints): SPEC says to accept both. An ``int32`` of -1 is a 10-byte varint,
    i.e. 2**64 - 1 before it is read back as two's complement."""
    values: list[int] = []
    for v in fields.get(number, []):
        if isinstance(v, bytes):
            i = 0
            while i < len(v):
                x, i = _varint(v, i)
                values.append(x)
        else:
            values.append(v)
    if signed:
        values = [x - (1 << 64) if x >= 1 << 63 else x for x in values]
    return values


def _one(fields: Fields, number: int, default: int = 0, signed: bool = False) -> int:
    values = _ints(fields, number, signed)
    return values[-1] if values else default


def _submessages(fields: Fields, number: int) -> list[Fields]:
    return [_message(v) for v in fields.get(number, []) if isinstance(v, bytes)]


# --- strategy files -------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One parameter's layout exactly as the strategy file states it."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]
    """The TensorMap entries as written, empty ones included."""
    opt_weight_shard_step: int = 0
    opt_weight_shard_size: int = 0


@dataclass(frozen=True)
class StrategyFile:
    stage: int
    layouts: dict[str, Layout]


def read_strategy(path: Path) -> StrategyFile:
    """A per-rank ``.ckpt`` strategy file, with field numbers from SPEC section 2:
    ParallelStrategyMap {2: items, 3: layout items}; ParallelStrategyItem {2: strategys};
    ParallelStrategys {1: stage}; ParallelLayoutItem {1: name, 2: layouts};
    ParallelLayouts {1: dev_matrix, 2: tensor_map, 3: param_split_shape, 6: step, 7: size};
    DevMatrix / TensorMap / ParamSplitShape {1: dim}."""
    top = _message(path.read_bytes())
    items = _submessages(top, 2)
    stage = 0
    if items:  # the stage is that of the first strategy item; current_stage is a save counter
        strategys = _submessages(items[0], 2)
        stage = _one(strategys[0], 1) if strategys else 0
    layouts: dict[str, Layout] = {}
    for item in _submessages(top, 3):
        name = b"".join(v for v in item.get(1, []) if isinstance(v, bytes)).decode("utf-8")
        if name.startswith(OPTIMIZER_PREFIXES):
            continue
        (lay,) = _submessages(item, 2)
        devs = [tuple(_ints(d, 1, signed=False)) for d in _submessages(lay, 1)]
        if len(devs) != 1:
            raise OracleError(f"{path}: {name}: expected one dev_matrix, found {len(devs)}")
        split_shape = [_ints(s, 1, signed=True) for s in _submessages(lay, 3)]
        if any(split_shape):
            raise OracleError(f"{path}: {name}: param_split_shape {split_shape} is not supported")
        layouts[name] = Layout(
            dev_matrix=devs[0],
            tensor_map=tuple(tuple(_ints(t, 1, signed=True)) for t in _submessages(lay, 2)),
            opt_weight_shard_step=_one(lay, 6, signed=True),
            opt_weight_shard_size=_one(lay, 7, signed=True),
        )
    return StrategyFile(stage, layouts)


# --- which slice a rank holds (SPEC section 3) ------------------------------------------------


def dim_axes(tensor_map: Sequence[Sequence[int]], ndim: int) -> list[list[int]]:
    """For each of the ``ndim`` tensor dims, the dev axes (counted from the right, -1 dropped)
    that split it.

    Layout form: one TensorMap per dim, trailing empty entries dropped (a 1-D tensor is written
    ``[[-1], []]``). Flat form: one TensorMap listing one axis per dim. The two read the same
    for a 1-D tensor; for more dims the entry count tells them apart."""
    entries = [list(e) for e in tensor_map]
    while entries and not entries[-1]:
        entries.pop()
    if len(entries) == ndim:
        return [[a for a in e if a != -1] for e in entries]
    if len(entries) == 1 and len(entries[0]) == ndim:
        return [[] if a == -1 else [a] for a in entries[0]]
    if ndim == 0 and all(a == -1 for e in entries for a in e):
        return []
    raise OracleError(f"tensor_map {entries} does not fit a {ndim}-dimensional tensor")


def unravel(index: int, dims: Sequence[int]) -> list[int]:
    """Row-major coordinates of ``index`` in ``dims`` (the last axis varies fastest)."""
    coords = []
    for d in reversed(dims):
        index, c = divmod(index, d)
        coords.append(c)
    return coords[::-1]


def place(
    layout: Layout, local_rank: int, slice_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(full shape, offsets)``: where the slice of shape ``slice_shape`` held by
    ``local_rank`` sits in the full tensor, computed as SPEC section 3 words it.

    With a slice of ones the offsets are the block's grid coordinates (dim 0 counting
    optimizer chunks), which is how the placement tables use it."""
    dev = list(layout.dev_matrix)
    n = len(dev)
    devices = math.prod(dev)
    if not 0 <= local_rank < devices:
        raise OracleError(f"local rank {local_rank} is outside dev_matrix {dev}")
    c = unravel(local_rank, dev)
    axes = dim_axes(layout.tensor_map, len(slice_shape))
    ts: list[int] = []  # split count of each dim
    idx: list[int] = []  # this rank's block index on each dim
    for entry in axes:
        split, index = 1, 0
        for a in entry:  # mixed radix, the first axis most significant
            if not 0 <= a < n:
                raise OracleError(f"tensor_map axis {a} is outside dev_matrix {dev}")
            split *= dev[n - 1 - a]
            index = index * dev[n - 1 - a] + c[n - 1 - a]
        ts.append(split)
        idx.append(index)

    eff, k = 1, 0
    step, size = layout.opt_weight_shard_step, layout.opt_weight_shard_size
    if step != 0 and size != 0 and slice_shape:
        eff = size if size > 0 else devices // math.prod(ts)
        used = {n - 1 - a for entry in axes for a in entry}  # matrix positions of used axes
        group = [
            r for r in range(devices) if all(unravel(r, dev)[i] == c[i] for i in used)
        ]  # ascending by construction
        k = group.index(local_rank) % eff

    full = [d * t for d, t in zip(slice_shape, ts)]
    offsets = [i * (f // t) for i, f, t in zip(idx, full, ts)]
    if slice_shape:
        full[0] *= eff
        offsets[0] = idx[0] * (full[0] // ts[0]) + k * (full[0] // (ts[0] * eff))
    return tuple(full), tuple(offsets)


# --- the training output ----------------------------------------------------------------------

_RANK_DIR = re.compile(r"^rank_(\d+)$")


def _rank_files(checkpoint: Path) -> dict[int, Path]:
    files: dict[int, Path] = {}
    for folder in checkpoint.iterdir():
        m = _RANK_DIR.match(folder.name)
        if m is None:
            continue
        found = sorted(folder.glob("*.safetensors"))
        if len(found) != 1:
            raise OracleError(f"{folder}: expected one .safetensors file, found {len(found)}")
        files[int(m.group(1))] = found[0]
    if sorted(files) != list(range(len(files))) or not files:
        raise OracleError(f"{checkpoint}: rank folders {sorted(files)} are not 0..N-1")
    return files


def _is_parameter(name: str) -> bool:
    return name not in SCALARS and not name.startswith(OPTIMIZER_PREFIXES)


@dataclass
class _Param:
    """A parameter being filled: its values and which of its elements are set."""

    full: np.ndarray
    filled: np.ndarray
    stage: int


def _bits(a: np.ndarray) -> np.ndarray:
    """The bit patterns of ``a``, so that equality is exact (NaN payloads, -0.0)."""
    return a.view(f"u{a.dtype.itemsize}")


def reassemble(root: str | Path, *, check_replicas: bool = True) -> dict[str, np.ndarray]:
    """Every model parameter of the training output in ``root`` (``checkpoint/``,
    ``strategy/``), whole. Optimizer states, accumulators and scalars are left out.

    Every file that has a parameter places its slice (SPEC: "one rule serves both" redundant
    and de-duplicated saves); an element placed twice must have the same bits every time
    (replicas agree), and every element must be placed (coverage)."""
    root = Path(root)
    files = _rank_files(root / "checkpoint")
    strategies = {
        r: read_strategy(root / "strategy" / f"ckpt_strategy_rank_{r}.ckpt") for r in files
    }
    stages = sorted({s.stage for s in strategies.values()})
    if stages != list(range(len(stages))):
        raise OracleError(f"stages {stages} are not 0..S-1")
    per_stage, rest = divmod(len(files), len(stages))
    if rest:
        raise OracleError(f"{len(files)} ranks do not split into {len(stages)} stages")
    # A parameter in several stages (a tied embedding) takes the lowest stage's layout.
    layouts: dict[str, tuple[int, Layout]] = {}
    for r in sorted(strategies, key=lambda r: (strategies[r].stage, r)):
        for name, layout in strategies[r].layouts.items():
            layouts.setdefault(name, (strategies[r].stage, layout))

    params: dict[str, _Param] = {}
    for rank, path in sorted(files.items()):
        stage = strategies[rank].stage
        if rank // per_stage != stage:
            raise OracleError(f"rank {rank} has stage {stage}, expected {rank // per_stage}")
        local = rank - stage * per_stage
        for name, piece in read_tensors(path).items():
            if not _is_parameter(name):
                continue
            if name in layouts:
                layout = layouts[name][1]
                if math.prod(layout.dev_matrix) != per_stage:
                    raise OracleError(f"{name}: dev_matrix {layout.dev_matrix} != {per_stage}")
                full_shape, offsets = place(layout, local, piece.shape)
            else:  # no layout: not split
                full_shape, offsets = piece.shape, (0,) * piece.ndim
            p = params.get(name)
            if p is None:
                p = params[name] = _Param(
                    np.zeros(full_shape, piece.dtype), np.zeros(full_shape, bool), stage
                )
            if p.full.shape != tuple(full_shape) or p.full.dtype != piece.dtype:
                raise OracleError(
                    f"{name}: rank {rank} gives {piece.dtype} {list(full_shape)}, another rank "
                    f"{p.full.dtype} {list(p.full.shape)}"
                )
            region = tuple(slice(o, o + s) for o, s in zip(offsets, piece.shape))
            seen = p.filled[region]
            agree = np.array_equal(_bits(p.full[region])[seen], _bits(piece)[seen])
            if check_replicas and not agree:
                raise OracleError(f"{name}: rank {rank}'s copy disagrees with a replica")
            p.full[region] = piece
            p.filled[region] = True

    for name, p in params.items():
        if not p.filled.all():
            missing = tuple(int(i) for i in np.argwhere(~p.filled)[0])
            should = _holders_of(layouts[name][1], per_stage, p.full.shape, missing)
            raise OracleError(
                f"{name}: element {list(missing)} is in no rank file; local ranks {should} of "
                f"stage {p.stage} should hold it"
            )
    return {name: p.full for name, p in params.items()}


def _holders_of(
    layout: Layout, devices: int, full_shape: Sequence[int], element: Sequence[int]
) -> list[int]:
    """The local ranks whose slice contains ``element``, for the coverage message."""
    ones = [1] * len(full_shape)
    grid, _ = place(layout, 0, ones)
    slice_shape = [f // g for f, g in zip(full_shape, grid)]
    out = []
    for r in range(devices):
        _, offsets = place(layout, r, slice_shape)
        if all(o <= e < o + s for o, e, s in zip(offsets, element, slice_shape)):
            out.append(r)
    return out
