"""Checkpoint 2.0's ``metadata.json``, read and checked (``docs/checkpoint2.md#3-metadatajson``,
``#4-storage_data``, ``#10-what-a-reader-checks``).

Every rule of the doc's checks table that concerns the metadata is enforced here, each failure
naming ``metadata.json``, the parameter or storage key, and what was expected. The records are
regrouped by parameter and slice; optimizer records are only counted, and their files told apart
by name, so nothing downstream needs to open an optimizer file.
"""

from __future__ import annotations

import ast
import json
import math
import mmap
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ms2hf.errors import CoverageError, FormatError
from ms2hf.io.dtypes import itemsize
from ms2hf.io.safetensors_reader import DuplicateKey, reject_duplicates
from ms2hf.io.sources.training_keys import KeyKind, key_kind

METADATA = "metadata.json"
COMMON = "common.json"
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


def load_json(path: Path) -> Any:
    """A JSON file, refused (naming it) when unreadable, not JSON or naming a key twice."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    return _parse(path, raw)


_RANK_LIST = re.compile(
    rb'"(rank_group|replica_id)"[ \t\r\n]*:[ \t\r\n]*\[([0-9 ,\t\r\n]{%d,})\]' % 32
)
"""A list of ranks in ``metadata.json``, of a dozen ranks or more (shorter ones cost less to
parse than to share): a normal save gives each of a slice's holders the same list of all of them
(960 slices x 256 records x 256 ranks in a 4096-rank save: most of its 420 MB)."""
_REF = "\x00"
"""Marks a list replaced by its number in the table of distinct lists (``load_metadata``); never
in a real file, whose strings hold no NUL (a file that does is read without the table)."""
_LIST_KEYS = ("rank_group", "replica_id")


def load_metadata(path: Path) -> Any:
    """``metadata.json``, as ``load_json`` reads it, but with every list of ranks parsed once
    per distinct list and shared (as a tuple): each one is first replaced in the text by its
    number in a table of the distinct lists (one pass of a regular expression over the mapped
    file), so the parser makes a few thousand lists instead of millions of integers. A normal
    4096-rank save: 420 MB parsed in 1.4 instead of 5.4 s, into 0.8 instead of 3.7 GB."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(b"\\u0000") >= 0:
                return load_json(path)
            table: dict[bytes, int] = {}

            def number(match: re.Match[bytes]) -> bytes:
                i = table.setdefault(match.group(2), len(table))
                return b'"%s":"\\u0000%d"' % (match.group(1), i)

            shrunk = _RANK_LIST.sub(number, m)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from e
    lists = [tuple(_parse(path, b"[" + body + b"]")) for body in table]

    def shared(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out = reject_duplicates(pairs)
        for key in _LIST_KEYS:
            value = out.get(key)
            if type(value) is str and value[:1] == _REF:
                out[key] = lists[int(value[1:])]
        return out

    return _parse(path, shrunk, shared)


def _parse(path: Path, raw: bytes, hook: Any = reject_duplicates) -> Any:
    try:
        value = json.loads(raw, object_pairs_hook=hook)
    except DuplicateKey as e:
        raise FormatError(f"{path}: names {e.args[0]!r} twice in one object") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(
            f"{path}: not valid JSON ({e}); truncated, or from a save that did not finish?"
        ) from e
    return value


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


def _dtype_tag(entry: dict[str, Any]) -> str | None:
    """The safetensors dtype of an entry's ``properties.dtype``; None when it names none."""
    props = entry.get("properties")
    ms = props.get("dtype") if isinstance(props, dict) else None
    return _BY_MS_NAME.get(ms.lower()) if isinstance(ms, str) else None


def _int(value: object, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


@dataclass(frozen=True)
class Record:
    file: str
    rank: int | None
    group: Sequence[int] | None


@dataclass(frozen=True)
class Entry:
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


class Metadata:
    """``metadata.json`` read and checked, the records regrouped by parameter and slice."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / METADATA
        doc = load_metadata(self.path)
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("state_dict_metadata"), dict)
            or not isinstance(doc.get("storage_data"), dict)
        ):
            self.fail(
                "expected a JSON object with 'state_dict_metadata' and 'storage_data' objects"
            )
        self.entries: dict[str, Any] = doc["state_dict_metadata"]
        self.records: dict[str, dict[int, list[Record]]] = {}
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

    def _record(self, key: str, rec: dict[str, Any]) -> Record:
        rank, group = rec.get("storage_rank"), rec.get("rank_group")
        if rank is not None and not _int(rank):
            self.fail(f"storage_data {key}: storage_rank {rank!r} is not a rank")
        # A tuple is a list the reader shared (load_metadata): digits only, so ranks.
        if (
            group is not None
            and type(group) is not tuple
            and not (
                isinstance(group, list)
                and set(map(type, group)) <= {int}
                and min(group, default=0) >= 0
            )
        ):
            self.fail(f"storage_data {key}: rank_group {str(group)[:100]} is not a list of ranks")
        return Record(rec["file_name"], rank, group)

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
        tag = _dtype_tag(entry)
        if tag is None:
            props = entry.get("properties")
            ms = props.get("dtype") if isinstance(props, dict) else None
            self.fail(
                f"parameter {name!r}: properties.dtype {ms!r} is not one of "
                f"{', '.join(MS_DTYPES.values())}"
            )
        return tag

    def entry(self, name: str) -> Entry:
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
        return Entry(
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

    def slice_records(self, name: str, entry: Entry) -> dict[int, list[Record]]:
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
        tag = _dtype_tag(raw) if isinstance(raw, dict) else None
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
