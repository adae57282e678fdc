"""Checkpoint 2.0 (mindformers' ``use_legacy_format: False``): one ``iteration_XXXXXXXX/`` folder
as a source plan, from ``metadata.json`` and the ``-model-`` files' headers alone
(``docs/checkpoint2.md``).

``metadata.json`` cuts every tensor into a grid (``axis_fragmentations``) and numbers the cells
row-major; ``storage_data`` says which file holds each cell (``slice id``). So placement is
arithmetic on the metadata, with no layout math: the cell's coordinates times the slice shape.
Optimizer states are told apart by their files' names and never opened, not even their headers:
a copy of the ``-model-`` files alone converts. Every rule of the doc's "What a reader checks"
table is enforced here, each failure naming the file, the parameter and what was expected.
"""

from __future__ import annotations

import ast
import gc
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ms2hf.errors import CoverageError, FormatError, LayoutError
from ms2hf.io.dtypes import itemsize
from ms2hf.io.placement import Grid, unravel
from ms2hf.io.safetensors_reader import DuplicateKey, SafetensorsHeader, reject_duplicates
from ms2hf.io.sources.plan import (
    CKPT2,
    Block,
    SourceFile,
    SourceParam,
    SourcePlan,
    StepChoice,
    whole_param,
)
from ms2hf.io.sources.training_keys import KeyKind, key_kind

log = logging.getLogger("ms2hf")

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
COMMON = "common.json"
ITERATION_DIR = re.compile(r"iteration_(\d{8,})")
MODEL_FILE = re.compile(r"(?:.+-)?model-(\d+)-(\d+)\.safetensors")
OPT_FILE = re.compile(r"(?:.+-)?opt-\d+-\d+\.safetensors")
"""mindformers tells its files apart by these full patterns (a prefix may contain ``-opt-``)."""
ONE_CARD_FILE = re.compile(r"(?:.+-)?model-0+-0*1\.safetensors")

MS_DTYPES = {
    "F32": "Float32",
    "BF16": "BFloat16",
    "F16": "Float16",
    "F64": "Float64",
    "I64": "Int64",
    "I32": "Int32",
    "I16": "Int16",
    "I8": "Int8",
    "U8": "UInt8",
    "BOOL": "Bool",
}
"""safetensors dtype -> MindSpore's name in ``metadata.json`` (matched case-insensitively)."""
_BY_MS_NAME = {ms.lower(): tag for tag, ms in MS_DTYPES.items()}

_SIMPLE_KEY = re.compile(r"\('([^'\\]*)', \((0|[1-9][0-9]*),\)\)")
"""``str((name, (slice_id,)))`` for a name without quotes or backslashes: what nearly every key
is, parsed without ``ast`` (a 4096-rank save has hundreds of thousands of keys)."""

MODEL = "model"
OPTIMIZER = "optimizer"


# --------------------------------------------------------------------------- which iteration


def find_iterations(checkpoint_dir: Path) -> dict[int, Path]:
    """Every ``iteration_XXXXXXXX`` folder of a checkpoint folder, by its number."""
    found: dict[int, Path] = {}
    for p in sorted(checkpoint_dir.iterdir()):
        m = ITERATION_DIR.fullmatch(p.name)
        if m and p.is_dir():
            n = int(m.group(1))
            if n in found:
                raise FormatError(
                    f"{checkpoint_dir}: {found[n].name} and {p.name} are both iteration {n}; "
                    "keep one"
                )
            found[n] = p
    return found


def iteration_number(folder: Path) -> int | None:
    m = ITERATION_DIR.fullmatch(folder.name)
    return int(m.group(1)) if m else None


def read_tracker(checkpoint_dir: Path) -> int | None:
    """The iteration the tracker names, or None without a tracker."""
    path = checkpoint_dir / TRACKER
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    if not (text.isascii() and text.isdigit()):
        raise FormatError(f"{path}: holds {text[:40]!r}, expected an iteration number")
    return int(text)


def _step_number(step: str, where: Path, present: str) -> int:
    if not (step.isascii() and step.isdigit()):
        raise FormatError(
            f"--step {step}: {where} is a Checkpoint 2.0 save, whose saves are iterations "
            f"(present: {present}); name one by its number, e.g. --step {present.split(', ')[-1]}"
        )
    return int(step)


def _listing(numbers: Iterable[int]) -> str:
    return ", ".join(map(str, sorted(numbers))) or "none"


def choose_iteration(
    checkpoint_dir: Path, step: str | None, folder: Path | None = None
) -> tuple[Path, StepChoice]:
    """The iteration folder to read (``docs/checkpoint2.md#2-which-iteration-to-read``): the
    one named (``folder``, or ``--step``), else the tracker's. An iteration newer than the
    tracker, or any without a tracker, may be a save in progress or one that died: it is never
    chosen silently; named, it is read with a warning."""
    found = find_iterations(checkpoint_dir)
    present = _listing(found)
    tracker = read_tracker(checkpoint_dir)
    choice = StepChoice(tuple(str(i) for i in sorted(found)), "")
    if folder is not None or step is not None:
        if folder is not None:
            number = iteration_number(folder)
            assert number is not None
            if step is not None and _step_number(step, checkpoint_dir, present) != number:
                raise FormatError(
                    f"--step {step} disagrees with the iteration folder given, {folder}"
                )
            reason = "the folder given"
        else:
            assert step is not None
            number = _step_number(step, checkpoint_dir, present)
            if number not in found:
                raise FormatError(
                    f"{checkpoint_dir}: no folder iteration_{number:08d} for --step {step} "
                    f"(iterations present: {present})"
                )
            folder, reason = found[number], "--step"
        if tracker is None or number > tracker:
            log.warning(
                "warning: reading iteration %d as asked, though %s; check that its save finished",
                number,
                f"no {TRACKER} names it"
                if tracker is None
                else f"it is newer than the tracker's {tracker}",
            )
        return folder, StepChoice(choice.present, reason)
    if not found:
        raise FormatError(f"{checkpoint_dir}: no iteration_XXXXXXXX folder")
    if tracker is None:
        raise FormatError(
            f"{checkpoint_dir}: no {TRACKER}, so no iteration is known to be complete (present: "
            f"{present}); a save in progress or one that died looks the same: name the "
            f"iteration to read, e.g. --step {max(found)}"
        )
    newer = sorted(i for i in found if i > tracker)
    if newer:
        raise FormatError(
            f"{checkpoint_dir}: iterations [{_listing(newer)}] are newer than the tracker's "
            f"{tracker}: a save in progress or one that died; name the iteration: --step "
            f"{tracker} for the tracker's, or --step {newer[-1]} to read the newest anyway"
        )
    if tracker not in found:
        raise FormatError(
            f"{checkpoint_dir / TRACKER}: names iteration {tracker}, but "
            f"iteration_{tracker:08d} is missing (a re-save that died?); present: {present}; "
            "name the iteration to read with --step"
        )
    return found[tracker], StepChoice(choice.present, "the tracker's")


# --------------------------------------------------------------------------- metadata.json


def _load_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return json.loads(raw, object_pairs_hook=reject_duplicates)
    except DuplicateKey as e:
        raise FormatError(f"{path}: names {e.args[0]!r} twice in one object") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(
            f"{path}: not valid JSON ({e}); truncated, or from a save that did not finish?"
        ) from e


def parse_storage_key(key: str) -> tuple[str, int] | None:
    """``"('name', (3,))"`` -> ``('name', 3)``, read as a Python literal (never ``eval``); None
    when the key is not of that form."""
    m = _SIMPLE_KEY.fullmatch(key)
    if m is not None:
        return m.group(1), int(m.group(2))
    try:
        value = ast.literal_eval(key)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], tuple)
        and len(value[1]) == 1
        and type(value[1][0]) is int
    ):
        return value[0], value[1][0]
    return None


def plain_file_name(name: object) -> bool:
    """A file name inside the iteration folder: never a path that leads elsewhere."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\x00")
        and not re.match(r"[A-Za-z]:", name)
    )


def _int(value: object, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


@dataclass(frozen=True)
class _Record:
    file: str
    rank: int | None
    group: list[int] | None


@dataclass(frozen=True)
class _Entry:
    """A ``state_dict_metadata`` entry, checked."""

    shape: tuple[int, ...]
    dtype: str
    grid: tuple[int, ...]
    local: tuple[int, ...]
    slices: tuple[int, ...]
    """Slice ids, ascending: grid order."""
    rank_list: tuple[int, ...]
    opt_chunks: int
    """The cuts of dim 0 that are the optimizer's (``optimizer_chunks``); for reports only."""


class _Metadata:
    """``metadata.json`` read and checked, the records regrouped by parameter and slice."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / METADATA
        doc = _load_json(self.path)
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("state_dict_metadata"), dict)
            or not isinstance(doc.get("storage_data"), dict)
        ):
            self.fail(
                "expected a JSON object with 'state_dict_metadata' and 'storage_data' objects"
            )
        self.entries: dict[str, Any] = doc["state_dict_metadata"]
        self.records: dict[str, dict[int, list[_Record]]] = {}
        """Model parameters' records, by parameter and slice id."""
        self.optimizer_copies: dict[str, int] = {}
        """Optimizer states' record counts."""
        self.kinds: dict[str, str] = {}
        self._read_storage(doc["storage_data"])

    def fail(self, what: str) -> NoReturn:
        raise FormatError(f"{self.path}: {what}")

    def _read_storage(self, storage: dict[str, Any]) -> None:
        """Group the records by parameter and slice. Optimizer records are only counted: their
        files are never opened, so only their names are checked (which kind of file)."""
        kinds: dict[object, str] = {}  # file name -> kind, each name checked once
        for key, recs in storage.items():
            parsed = parse_storage_key(key)
            if parsed is None:
                self.fail(
                    f"storage_data key {key[:200]!r} is not of the form ('<name>', (<slice id>,))"
                )
            name, sid = parsed
            if name not in self.entries:
                self.fail(f"storage_data {key}: no such parameter in state_dict_metadata")
            if not isinstance(recs, list) or not recs:
                self.fail(f"storage_data {key}: expected a non-empty list of storage records")
            for rec in recs:
                file = rec.get("file_name") if isinstance(rec, dict) else None
                kind = kinds.get(file)
                if kind is None:
                    kind = kinds[file] = self._file_kind(key, rec)
                if self.kinds.setdefault(name, kind) != kind:
                    self.fail(f"parameter {name!r}: stored in both model and optimizer files")
            if kind == MODEL:
                records = [self._record(key, rec) for rec in recs]
                self.records.setdefault(name, {})[sid] = records
            else:
                self.optimizer_copies[name] = self.optimizer_copies.get(name, 0) + len(recs)

    def _record(self, key: str, rec: dict[str, Any]) -> _Record:
        rank, group = rec.get("storage_rank"), rec.get("rank_group")
        if rank is not None and not _int(rank):
            self.fail(f"storage_data {key}: storage_rank {rank!r} is not a rank")
        if group is not None and not (
            isinstance(group, list)
            and set(map(type, group)) <= {int}
            and min(group, default=0) >= 0
        ):
            self.fail(f"storage_data {key}: rank_group {str(group)[:100]} is not a list of ranks")
        return _Record(rec["file_name"], rank, group)

    def _file_kind(self, key: str, rec: object) -> str:
        if not isinstance(rec, dict):
            self.fail(f"storage_data {key}: record {str(rec)[:100]} is not an object")
        file = rec.get("file_name")
        if not plain_file_name(file):
            self.fail(
                f"storage_data {key}: file_name {file!r} is not a plain file name in the "
                "iteration folder"
            )
        assert isinstance(file, str)
        if MODEL_FILE.fullmatch(file):
            return MODEL
        if OPT_FILE.fullmatch(file):
            return OPTIMIZER
        self.fail(
            f"storage_data {key}: file_name {file!r} is neither a model file "
            "('[<prefix>-]model-<i>-<n>.safetensors') nor an optimizer file ('...-opt-...')"
        )

    def kind(self, name: str) -> str:
        """Where a described tensor lives: a model parameter in ``-model-`` files, an optimizer
        state in ``-opt-`` files (a parameter with no record is still a model parameter)."""
        kind = self.kinds.get(name)
        if kind is None:
            return MODEL if key_kind(name) is KeyKind.PARAMETER else OPTIMIZER
        if kind == OPTIMIZER and key_kind(name) is KeyKind.PARAMETER:
            self.fail(
                f"parameter {name!r}: stored only in optimizer files; model parameters are in "
                "'-model-' files"
            )
        return kind

    def dtype(self, name: str, entry: dict[str, Any]) -> str:
        props = entry.get("properties")
        ms = props.get("dtype") if isinstance(props, dict) else None
        tag = _BY_MS_NAME.get(ms.lower()) if isinstance(ms, str) else None
        if tag is None:
            self.fail(
                f"parameter {name!r}: properties.dtype {ms!r} is not one of "
                f"{', '.join(MS_DTYPES.values())}"
            )
        return tag

    def entry(self, name: str) -> _Entry:
        """Check one model parameter's entry (the doc's table, in its order)."""
        raw = self.entries[name]
        if not isinstance(raw, dict):
            self.fail(f"parameter {name!r}: entry is not an object")
        shape, frags = raw.get("global_shape"), raw.get("axis_fragmentations")
        if not (isinstance(shape, list) and all(_int(d) for d in shape)):
            self.fail(f"parameter {name!r}: global_shape {shape!r} is not a list of sizes")
        if not (
            isinstance(frags, list)
            and all(_int(f, 1) for f in frags)
            and len(frags) >= len(shape)
            and all(f == 1 for f in frags[len(shape) :])
        ):
            self.fail(
                f"parameter {name!r}: axis_fragmentations {frags!r} does not fit global_shape "
                f"{shape} (one positive count per dim; only trailing 1s may exceed it)"
            )
        grid = tuple(frags[: len(shape)])
        for d, (n, g) in enumerate(zip(shape, grid)):
            if n % g:
                self.fail(
                    f"parameter {name!r}: dim {d} of global_shape {shape} is not divisible by {g}"
                )
        local = tuple(n // g for n, g in zip(shape, grid))
        slices = self._chunks(name, raw.get("chunk"), grid, local)
        layout = raw.get("layout")
        if layout is not None and not isinstance(layout, dict):
            self.fail(f"parameter {name!r}: layout {layout!r} is neither an object nor null")
        rank_list: tuple[int, ...] = ()
        opt_chunks = 1
        if layout is not None:
            if layout.get("interleaved_parallel"):
                self.fail(f"parameter {name!r}: interleaved_parallel layouts are not supported")
            ranks = layout.get("rank_list")
            if isinstance(ranks, list) and all(_int(r) for r in ranks):
                rank_list = tuple(ranks)
            opt_chunks = _optimizer_chunks(layout, grid)
        if len(shape) > 2 and any(g > 1 for g in grid[1:]):
            self.fail(
                f"parameter {name!r}: a {len(shape)}-dimensional tensor cut past dim 0 "
                f"(axis_fragmentations {grid}) is not supported"
            )
        return _Entry(
            tuple(shape),
            self.dtype(name, raw),
            grid,
            local,
            tuple(sorted(slices)),
            rank_list,
            opt_chunks,
        )

    def _chunks(
        self, name: str, chunks: object, grid: tuple[int, ...], local: tuple[int, ...]
    ) -> set[int]:
        if not isinstance(chunks, list) or not chunks:
            self.fail(f"parameter {name!r}: no chunk list")
        count = math.prod(grid)
        seen: set[int] = set()
        for chunk in chunks:
            offset = chunk.get("global_offset") if isinstance(chunk, dict) else None
            if not (isinstance(offset, list) and len(offset) == 1 and type(offset[0]) is int):
                self.fail(
                    f"parameter {name!r}: chunk {chunk!r} has no one-element global_offset "
                    "(a slice id)"
                )
            sid = offset[0]
            if not 0 <= sid < count:
                self.fail(f"parameter {name!r}: slice id {sid} out of range 0..{count - 1}")
            if sid in seen:
                self.fail(f"parameter {name!r}: slice id {sid} listed twice")
            assert isinstance(chunk, dict)
            if chunk.get("local_shape") != list(local):
                self.fail(
                    f"parameter {name!r}: chunk {sid} local_shape {chunk.get('local_shape')} != "
                    f"{list(local)} (global_shape / axis_fragmentations)"
                )
            seen.add(sid)
        if len(seen) != count:
            missing = sorted(set(range(count)) - seen)
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            self.fail(
                f"parameter {name!r}: chunks do not tile "
                f"{[n * g for n, g in zip(local, grid)]}: slice id(s) {missing[:8]}{more} missing"
            )
        return seen

    def slice_records(self, name: str, entry: _Entry) -> dict[int, list[_Record]]:
        recs = self.records.get(name, {})
        for sid in entry.slices:
            if sid not in recs:
                raise CoverageError(
                    f"{self.path}: parameter {name!r}: slice {sid} has no storage record "
                    "(no file holds it)"
                )
        extra = sorted(set(recs) - set(entry.slices))
        if extra:
            self.fail(
                f"parameter {name!r}: storage_data has records for slice {extra[0]}, which its "
                "chunks do not describe"
            )
        return recs

    def optimizer_bytes(self, name: str) -> int:
        """What the optimizer files hold of a state, as described (never opened to check)."""
        raw = self.entries[name]
        props = raw.get("properties") if isinstance(raw, dict) else None
        ms = props.get("dtype") if isinstance(props, dict) else None
        tag = _BY_MS_NAME.get(ms.lower()) if isinstance(ms, str) else None
        chunks = raw.get("chunk") if isinstance(raw, dict) else None
        if tag is None or not isinstance(chunks, list) or not chunks:
            return 0
        local = chunks[0].get("local_shape") if isinstance(chunks[0], dict) else None
        if not (isinstance(local, list) and all(_int(d) for d in local)):
            return 0
        return math.prod(local) * itemsize(tag) * self.optimizer_copies.get(name, 0)


def _optimizer_chunks(layout: dict[str, Any], grid: tuple[int, ...]) -> int:
    """How many of dim 0's cuts are the optimizer's. The metadata does not say: optimizer
    sharding appends the device axes the parameter's own map leaves unused to dim 0's entry, in
    device-matrix order (axis numbers descending), turning it into a list; a Qwen3 parameter's own
    dim-0 split is over the last axis (tp, ep), if any. So a list's descending tail is the
    optimizer's (``docs/checkpoint2.md#33-layout``). Only reports use this; reading needs only
    the grid."""
    dev, tensor_map = layout.get("device_matrix"), layout.get("tensor_map")
    if not (isinstance(dev, list) and all(_int(d, 1) for d in dev)):
        return 1
    if not (isinstance(tensor_map, list) and tensor_map and isinstance(tensor_map[0], list)):
        return 1
    axes = tensor_map[0]
    if not axes or not all(_int(a) and a < len(dev) for a in axes):
        return 1
    start = len(axes) - 1
    while start > 0 and axes[start - 1] > axes[start]:
        start -= 1
    chunks = math.prod(dev[len(dev) - 1 - a] for a in axes[start:])
    return chunks if grid and grid[0] % chunks == 0 else 1


# --------------------------------------------------------------------------- the plan


class _Headers:
    """The ``-model-`` files' headers, each read once, when first needed."""

    def __init__(self, folder: Path, meta: _Metadata) -> None:
        self.folder = folder
        self.meta = meta
        self.headers: dict[str, SafetensorsHeader] = {}

    def get(self, file: str, name: str, sid: int) -> SafetensorsHeader:
        header = self.headers.get(file)
        if header is None:
            path = self.folder / file
            if not path.is_file():
                self.meta.fail(f"parameter {name!r} slice {sid}: file {file} is missing")
            header = self.headers[file] = SafetensorsHeader(path)
        return header


def _param(
    name: str, entry: _Entry, records: Mapping[int, list[_Record]], headers: _Headers
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
        doc = _load_json(path)
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


@contextmanager
def _without_gc() -> Iterator[None]:
    """Planning a large save makes millions of small objects, none in a cycle; the cyclic
    collector would scan them over and over and find nothing (half the planning time of a
    4096-rank save)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def plan_iteration(folder: Path, choice: StepChoice | None = None) -> SourcePlan:
    """Plan reading one iteration folder: every model parameter's blocks, from ``metadata.json``
    and the ``-model-`` files' headers; optimizer files are never opened."""
    with _without_gc():
        return _plan_iteration(folder, choice)


def _plan_iteration(folder: Path, choice: StepChoice | None) -> SourcePlan:
    iteration = iteration_number(folder)
    step = str(iteration) if iteration is not None else folder.name
    counters = _read_common(folder, iteration)
    if not (folder / METADATA).is_file():
        return _plan_one_card(folder, step, choice, counters)
    meta = _Metadata(folder)
    headers = _Headers(folder, meta)
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
    meta: _Metadata,
    headers: _Headers,
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
    params: dict[str, SourceParam] = {}
    scalars: dict[str, SourceParam] = {}
    optimizer_bytes = scalar_bytes = 0
    for name, info in header.tensors.items():
        kind = key_kind(name)
        if kind is KeyKind.OPTIMIZER:
            optimizer_bytes += info.nbytes
        elif kind is KeyKind.SCALAR:
            scalar_bytes += info.nbytes
            scalars[name] = whole_param(header.path, 0, info)
        else:
            param = whole_param(header.path, 0, info)
            params[name] = SourceParam(
                param.name, param.shape, param.dtype, param.blocks, holders=((0,),)
            )
    return SourcePlan(
        step=step,
        files=(SourceFile(0, 0, header.path, header.metadata),),
        params=params,
        scalars=scalars,
        remove_redundancy=False,
        num_stages=1,
        optimizer_bytes=optimizer_bytes,
        scalar_bytes=scalar_bytes,
        source_format=CKPT2,
        root=folder,
        ranks=1,
        choice=choice,
        counters=counters,
    )
