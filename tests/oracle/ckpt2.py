"""Checkpoint 2.0 (mindformers ``use_legacy_format: False``): every parameter of an iteration
folder put back together from ``metadata.json`` and the files it names.

Written from ``docs/checkpoint2.md`` with numpy and :mod:`tests.oracle.files` only; nothing here
comes from ``ms2hf``. It is strict on purpose: every rule of the doc's "What a reader checks"
section raises :class:`Ckpt2Error` here, so a test can tell a malformed folder from a good one.
It reads whole files into memory: small test checkpoints only.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import numpy as np

from tests.oracle.files import DTYPES, read_tensors

TRACKER = "latest_checkpointed_iteration.txt"
ITERATION_DIR = re.compile(r"iteration_(\d{8,})")
MODEL_FILE = re.compile(r"(?:.+-)?model-\d{7}-\d{7}\.safetensors")
OPT_FILE = re.compile(r"(?:.+-)?opt-\d{7}-\d{7}\.safetensors")

# metadata.json dtype names (MindSpore's str(dtype)) -> numpy dtype of the stored tensor
DTYPE_NAMES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float64": "F64",
    "int32": "I32",
    "int64": "I64",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


class Ckpt2Error(ValueError):
    """A Checkpoint 2.0 folder that cannot be read as it stands."""


# --------------------------------------------------------------------------- iteration choice


def iterations(checkpoint_dir: Path) -> dict[int, Path]:
    """Every ``iteration_XXXXXXXX`` folder, by its number."""
    out = {}
    for p in Path(checkpoint_dir).iterdir():
        m = ITERATION_DIR.fullmatch(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def select_iteration(checkpoint_dir: str | Path, iteration: int | None = None) -> Path:
    """The iteration folder to read: the one asked for, else the one the tracker names.

    Never guesses: no tracker, a tracker naming a missing folder, or a folder newer than the
    tracker (a save still being written, or one that died) is an error unless ``iteration`` is
    given explicitly.
    """
    root = Path(checkpoint_dir)
    found = iterations(root)
    if iteration is not None:
        if iteration not in found:
            raise Ckpt2Error(f"no folder iteration_{iteration:08d} in {root}")
        return found[iteration]
    tracker = root / TRACKER
    if not tracker.is_file():
        raise Ckpt2Error(
            f"{root} has no {TRACKER}: name the iteration to read (found {sorted(found)})"
        )
    text = tracker.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise Ckpt2Error(f"{tracker} does not hold an iteration number: {text!r}")
    latest = int(text)
    if latest not in found:
        raise Ckpt2Error(
            f"{tracker} names iteration {latest}, but iteration_{latest:08d} is missing"
        )
    newer = sorted(i for i in found if i > latest)
    if newer:
        raise Ckpt2Error(
            f"iteration(s) {newer} are newer than the tracker's {latest}: a save in progress or "
            "one "
            f"that died; name the iteration to read"
        )
    return found[latest]


# --------------------------------------------------------------------------- metadata.json


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise Ckpt2Error(f"metadata.json: duplicate key {k!r}")
        out[k] = v
    return out


def load_metadata(folder: Path) -> dict:
    path = Path(folder) / "metadata.json"
    if not path.is_file():
        raise Ckpt2Error(
            f"{folder} has no metadata.json (a one-card save: the files hold whole tensors)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise Ckpt2Error(f"{path} is not valid JSON: {e}") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("state_dict_metadata"), dict)
        or not isinstance(meta.get("storage_data"), dict)
    ):
        raise Ckpt2Error(
            f"{path}: expected an object with 'state_dict_metadata' and 'storage_data'"
        )
    return meta


def parse_storage_key(key: str) -> tuple[str, int]:
    """``"('decoder.x.weight', (3,))"`` -> ``('decoder.x.weight', 3)``, as a Python literal."""
    try:
        value = ast.literal_eval(key)
    except (ValueError, SyntaxError):
        raise Ckpt2Error(f"storage_data key {key!r} is not a Python literal") from None
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], tuple)
        or len(value[1]) != 1
        or type(value[1][0]) is not int
    ):
        raise Ckpt2Error(f"storage_data key {key!r} is not of the form ('<name>', (<slice id>,))")
    return value[0], value[1][0]


def check_file_name(name: object, where: str) -> str:
    """A record's file_name must be a plain file name inside the iteration folder."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith("~")
        or re.match(r"^[A-Za-z]:", name)
    ):
        raise Ckpt2Error(
            f"{where}: file_name {name!r} is not a plain file name in the iteration folder"
        )
    return name


def _ints(value: object, what: str, minimum: int) -> list[int]:
    if not isinstance(value, list) or not all(type(x) is int and x >= minimum for x in value):
        raise Ckpt2Error(f"{what}: expected a list of integers >= {minimum}, got {value!r}")
    return value


def describe(
    name: str, entry: dict
) -> tuple[list[int], list[int], list[int], dict[int, list[int]]]:
    """Check one ``state_dict_metadata`` entry; return (global_shape, grid, local_shape,
    {slice id: element offsets})."""
    where = f"metadata.json parameter {name!r}"
    if not isinstance(entry, dict):
        raise Ckpt2Error(f"{where}: not an object")
    layout = entry.get("layout")
    if layout is not None and (not isinstance(layout, dict) or layout.get("interleaved_parallel")):
        raise Ckpt2Error(f"{where}: interleaved_parallel layouts are not supported")
    shape = _ints(entry.get("global_shape"), f"{where} global_shape", 0)
    frags = _ints(entry.get("axis_fragmentations"), f"{where} axis_fragmentations", 1)
    if len(frags) < len(shape) or any(f != 1 for f in frags[len(shape) :]):
        raise Ckpt2Error(
            f"{where}: axis_fragmentations {frags} does not fit global_shape {shape} "
            f"(only trailing 1s may exceed the rank)"
        )
    grid = frags[: len(shape)]
    for d, (n, f) in enumerate(zip(shape, grid)):
        if n % f:
            raise Ckpt2Error(f"{where}: dim {d} of global_shape {shape} is not divisible by {f}")
    local = [n // f for n, f in zip(shape, grid)]
    count = math.prod(grid)
    chunks = entry.get("chunk")
    if not isinstance(chunks, list) or not chunks:
        raise Ckpt2Error(f"{where}: no chunk list")
    offsets: dict[int, list[int]] = {}
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise Ckpt2Error(f"{where}: chunk {chunk!r} is not an object")
        gid = chunk.get("global_offset")
        if not isinstance(gid, list) or len(gid) != 1 or type(gid[0]) is not int:
            raise Ckpt2Error(f"{where}: global_offset {gid!r} is not a one-element slice id")
        sid = gid[0]
        if not 0 <= sid < count:
            raise Ckpt2Error(f"{where}: slice id {sid} out of range 0..{count - 1} for grid {grid}")
        if chunk.get("local_shape") != local:
            raise Ckpt2Error(
                f"{where}: chunk {sid} local_shape {chunk.get('local_shape')} != {local} "
                f"(global_shape / axis_fragmentations)"
            )
        if sid in offsets:
            raise Ckpt2Error(f"{where}: slice id {sid} listed twice")
        offsets[sid] = [i * n for i, n in zip(np.unravel_index(sid, grid) if grid else (), local)]
    if len(offsets) != count:
        missing = sorted(set(range(count)) - set(offsets))
        raise Ckpt2Error(
            f"{where}: chunks do not tile global_shape {shape}: slice id(s) {missing} missing"
        )
    return shape, grid, local, offsets


def records(meta: dict) -> dict[str, dict[int, list[dict]]]:
    """storage_data regrouped: {parameter: {slice id: [record, ...]}}, every record checked."""
    out: dict[str, dict[int, list[dict]]] = {}
    for key, recs in meta["storage_data"].items():
        name, sid = parse_storage_key(key)
        if name not in meta["state_dict_metadata"]:
            raise Ckpt2Error(f"storage_data {key}: no such parameter in state_dict_metadata")
        if not isinstance(recs, list) or not recs:
            raise Ckpt2Error(f"storage_data {key}: no storage record")
        for rec in recs:
            if not isinstance(rec, dict):
                raise Ckpt2Error(f"storage_data {key}: record {rec!r} is not an object")
            check_file_name(rec.get("file_name"), f"storage_data {key}")
        if sid in out.setdefault(name, {}):
            raise Ckpt2Error(f"storage_data {key}: key given twice")
        out[name][sid] = recs
    return out


# --------------------------------------------------------------------------- reassembly


def reassemble(folder: str | Path, which: str = "model") -> dict[str, np.ndarray]:
    """Every full parameter of an iteration folder whose pieces live in ``which`` files
    (``"model"``: the ``-model-`` files, ``"opt"``: the ``-opt-`` files, ``"all"``: both).

    Each slice is copied from its file at the element offsets its slice id gives; a file holding
    the whole parameter (``global_shape`` where ``local_shape`` was described) gives the slice's
    region. Every record of a slice is read and all must agree, byte for byte.
    """
    folder = Path(folder)
    meta = load_metadata(folder)
    by_param = records(meta)
    cache: dict[str, dict[str, np.ndarray]] = {}

    def tensor(file_name: str, name: str, where: str) -> np.ndarray:
        if file_name not in cache:
            path = folder / file_name
            if not path.is_file():
                raise Ckpt2Error(f"{where}: file {file_name} is missing")
            cache[file_name] = read_tensors(path)
        if name not in cache[file_name]:
            raise Ckpt2Error(f"{where}: {file_name} holds no tensor {name!r}")
        return cache[file_name][name]

    out: dict[str, np.ndarray] = {}
    for name, entry in meta["state_dict_metadata"].items():
        shape, _, local, offsets = describe(name, entry)
        recs = by_param.get(name, {})
        kinds = {_kind(r["file_name"]) for rs in recs.values() for r in rs}
        if len(kinds) > 1:
            raise Ckpt2Error(f"parameter {name!r}: stored in both model and optimizer files")
        if which != "all" and kinds and kinds != {which}:
            continue
        dtype_name = (
            entry.get("properties", {}).get("dtype")
            if isinstance(entry.get("properties"), dict)
            else None
        )
        want = DTYPE_NAMES.get(str(dtype_name).lower())
        if want is None:
            raise Ckpt2Error(f"parameter {name!r}: unknown dtype {dtype_name!r}")
        full = None
        forms: set[str] = set()  # "slice" and/or "whole": one parameter never mixes them
        whole: bytes | None = None
        for sid, off in sorted(offsets.items()):
            if sid not in recs:
                raise Ckpt2Error(f"parameter {name!r}: slice {sid} has no storage record")
            region = tuple(slice(o, o + n) for o, n in zip(off, local))
            pieces = []
            for rec in recs[sid]:
                where = f"parameter {name!r} slice {sid}"
                t = tensor(rec["file_name"], name, where)
                if t.dtype != DTYPES[want]:
                    raise Ckpt2Error(
                        f"{where}: {rec['file_name']} stores {t.dtype}, metadata says {dtype_name}"
                    )
                if list(t.shape) == local:
                    forms.add("slice")
                    pieces.append(t)
                elif list(t.shape) == shape:
                    # The whole parameter (a normal save gathered it): every copy must be the same.
                    forms.add("whole")
                    if whole is None:
                        whole = t.tobytes()
                    elif t.tobytes() != whole:
                        raise Ckpt2Error(f"{where}: whole-tensor copies of the parameter differ")
                    pieces.append(t[region])
                else:
                    raise Ckpt2Error(
                        f"{where}: {rec['file_name']} holds shape {list(t.shape)}, expected "
                        f"the slice {local} or the whole {shape}"
                    )
            if len(forms) > 1 and local != shape:
                raise Ckpt2Error(
                    f"parameter {name!r}: some files hold slices, others the whole tensor"
                )
            first = pieces[0]
            for p in pieces[1:]:
                if p.tobytes() != first.tobytes():
                    raise Ckpt2Error(f"parameter {name!r} slice {sid}: replicas differ")
            if full is None:
                full = np.empty(shape, first.dtype)
            full[region] = first
        extra = set(recs) - set(offsets)
        if extra:
            raise Ckpt2Error(
                f"parameter {name!r}: storage records for undescribed slice ids {sorted(extra)}"
            )
        out[name] = full
    return out


def _kind(file_name: str) -> str:
    if MODEL_FILE.fullmatch(file_name):
        return "model"
    if OPT_FILE.fullmatch(file_name):
        return "opt"
    raise Ckpt2Error(f"file_name {file_name!r} is neither a -model- nor an -opt- file")
