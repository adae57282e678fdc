"""A strict safetensors header reader.

``safetensors.numpy`` cannot read BF16 and loads whole tensors; a converter needs neither. This
reader parses the header itself and enforces every rule of the format
(``docs/legacy-format.md#safetensors-rules``) with an error that names the file, so that a plan
can be built from headers alone. The bytes are read
later, through ``ms2hf.io.mapped``.

A save of thousands of ranks has thousands of headers to read, yet far fewer distinct ones (the
ranks of a tensor-parallel group save the same keys in the same shapes): ``read_headers`` reads
each with one 64 KiB ``pread``, a few threads ahead of the caller, and parses each distinct
header once (a 4096-rank save: 1555 distinct headers).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ms2hf.errors import FormatError
from ms2hf.io.dtypes import NUMPY_DTYPES, nbytes
from ms2hf.io.read_ahead import read_in_order

MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes are, from the header alone."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the first element in the file."""
    nbytes: int


class DuplicateKey(ValueError):
    """A JSON object names one key twice (``json`` would silently keep the last)."""


def reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for ``json.loads`` that refuses duplicate keys (``DuplicateKey``).
    Built in C first and searched only on a mismatch: a large ``metadata.json`` has a million
    objects."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return out


def _parse_entry(path: Path, name: str, raw: object) -> tuple[str, tuple[int, ...], int, int]:
    if type(raw) is dict:  # the usual, valid entry, checked with fewer steps
        dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
        if (
            type(dtype) is str
            and dtype in NUMPY_DTYPES
            and type(shape) is list
            and (not shape or (set(map(type, shape)) == {int} and min(shape) >= 0))
            and type(offsets) is list
            and len(offsets) == 2
            and type(offsets[0]) is int
            and type(offsets[1]) is int
            and 0 <= offsets[0] <= offsets[1]
            and offsets[1] - offsets[0] == nbytes(dtype, tuple(shape))
        ):
            return dtype, tuple(shape), offsets[0], offsets[1]
    return _check_entry(path, name, raw)


def _check_entry(path: Path, name: str, raw: object) -> tuple[str, tuple[int, ...], int, int]:
    """Every rule, with the message for the first one broken."""

    def bad(what: str) -> FormatError:
        return FormatError(f"{path}: tensor {name!r}: {what}")

    if not isinstance(raw, dict):
        raise bad("entry is not a JSON object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in NUMPY_DTYPES:
        raise bad(f"unknown dtype {dtype!r} (expected one of {', '.join(NUMPY_DTYPES)})")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise bad(f"data_offsets {offsets!r} is not a pair [begin, end] with begin <= end")
    expected = nbytes(dtype, tuple(shape))
    if offsets[1] - offsets[0] != expected:
        raise bad(
            f"shape {shape} of {dtype} needs {expected} bytes but data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


PREFETCH_BYTES = 64 * 1024
"""Read at once from the start of a file: the length and, usually, the whole header."""


@dataclass(frozen=True)
class _Parsed:
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_bytes: int
    """Bytes of tensor data the header describes."""


HeaderCache = dict[bytes, _Parsed]
"""Parsed headers by their exact bytes (``read_headers``)."""


def _read_raw(path: Path) -> tuple[bytes, int]:
    """The header bytes (after the 8-byte length) and the file's size, in one or two reads."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, PREFETCH_BYTES, 0)
            if len(head) < 8:
                raise FormatError(
                    f"{path}: truncated: {size} bytes, shorter than the 8-byte header length"
                )
            (n,) = struct.unpack("<Q", head[:8])
            if n > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                    "(not a safetensors file, or a corrupt one)"
                )
            if 8 + n > size:
                raise FormatError(
                    f"{path}: header length {n} runs past the end of the file ({size} bytes); "
                    "the file is truncated or not safetensors"
                )
            raw = head[8 : 8 + n]
            while len(raw) < n:
                more = os.pread(fd, n - len(raw), 8 + len(raw))
                if not more:
                    raise FormatError(f"{path}: shrank while its header was being read")
                raw += more
        finally:
            os.close(fd)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    return raw, size


def _parse(path: Path, raw: bytes) -> _Parsed:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicates)
    except DuplicateKey as e:
        raise FormatError(
            f"{path}: the header names {e.args[0]!r} twice (tensor names must be unique)"
        ) from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is JSON but not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    entries = sorted(
        ((name, *_parse_entry(path, name, raw)) for name, raw in header.items()),
        key=lambda e: (e[3], e[4]),
    )
    data_start = 8 + len(raw)
    end = 0
    tensors: dict[str, TensorInfo] = {}
    for name, dtype, shape, begin, stop in entries:
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else "leaves a gap"
            raise FormatError(
                f"{path}: tensor {name!r} at data_offsets [{begin}, {stop}] {what} "
                f"(expected it to start at {end})"
            )
        end = stop
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, stop - begin)
    return _Parsed(metadata, tensors, end)


class SafetensorsHeader:
    """One safetensors file's validated header: metadata and where each tensor's bytes are.

    Headers read together (``read_headers``) share one parse when their bytes are identical:
    the same ``metadata`` and ``tensors`` objects, which no reader may modify. Each file's own
    size is still checked against what its header describes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        cache: HeaderCache | None = None,
        read: tuple[bytes, int] | None = None,
    ) -> None:
        self.path = Path(path)
        raw, size = _read_raw(self.path) if read is None else read
        parsed = cache.get(raw) if cache is not None else None
        if parsed is None:
            parsed = _parse(self.path, raw)
            if cache is not None:
                cache[raw] = parsed
        self.metadata: dict[str, str] = parsed.metadata
        self.tensors: dict[str, TensorInfo] = parsed.tensors
        described = 8 + len(raw) + parsed.data_bytes
        if described != size:
            if described > size:
                raise FormatError(
                    f"{self.path}: truncated: the header describes {described} bytes but the "
                    f"file has {size}"
                )
            raise FormatError(
                f"{self.path}: {size - described} unexpected bytes after the last tensor"
            )


def read_headers(paths: Iterable[str | os.PathLike[str]]) -> list[SafetensorsHeader]:
    """Every file's header, in order: read a few threads ahead, each distinct header parsed
    once. The first bad file in order is the one reported."""
    files = [Path(p) for p in paths]
    cache: HeaderCache = {}
    return [
        SafetensorsHeader(path, cache, read)
        for path, read in zip(files, read_in_order(files, _read_raw))
    ]
