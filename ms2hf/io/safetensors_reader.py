"""A strict safetensors header reader.

``safetensors.numpy`` cannot read BF16 and loads whole tensors; a converter needs neither. This
reader parses the header itself and enforces every rule of the format
(``docs/legacy-format.md#safetensors-rules``) with an error that names the file, so that a plan
can be built from headers alone. The bytes are read
later, through ``ms2hf.io.mapped``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ms2hf.errors import FormatError
from ms2hf.io.dtypes import NUMPY_DTYPES, nbytes

MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
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


class SafetensorsHeader:
    """One safetensors file's validated header: metadata and where each tensor's bytes are."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._read_header()

    def _read_header(self) -> None:
        path = self.path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise FormatError(
                        f"{path}: truncated: {size} bytes, shorter than the 8-byte header length"
                    )
                (n,) = struct.unpack("<Q", prefix)
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
                raw = f.read(n)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
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
        self.metadata = metadata

        entries = sorted(
            ((name, *_parse_entry(path, name, raw)) for name, raw in header.items()),
            key=lambda e: (e[3], e[4]),
        )
        data_start = 8 + n
        end = 0
        for name, dtype, shape, begin, stop in entries:
            if begin != end:
                what = "overlaps the previous tensor" if begin < end else "leaves a gap"
                raise FormatError(
                    f"{path}: tensor {name!r} at data_offsets [{begin}, {stop}] {what} "
                    f"(expected it to start at {end})"
                )
            end = stop
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, stop - begin)
        if data_start + end != size:
            if data_start + end > size:
                raise FormatError(
                    f"{path}: truncated: the header describes {data_start + end} bytes but the "
                    f"file has {size}"
                )
            raise FormatError(
                f"{path}: {size - data_start - end} unexpected bytes after the last tensor"
            )
