"""A streaming safetensors writer: the header first, from names, dtypes and shapes alone, then
each tensor's bytes at its known offset, in as many pieces and from as many threads as wanted.

The file is written under a temporary name and renamed only when every byte is in place, so a
file with the final name is always complete. Tensors are ordered as the reference writer orders
them (wider dtypes first, then by name), with compact JSON padded to a multiple of 8 bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ms2hf.errors import OutputError
from ms2hf.io.dtypes import itemsize, to_numpy


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardLayout:
    """Where everything goes in one output file, decided before any byte is written."""

    header: bytes
    """The 8-byte length and the padded JSON header."""
    entries: tuple[TensorEntry, ...]
    """In file order."""
    starts: Mapping[str, int]
    """Absolute file offset of each tensor's first byte."""
    size: int


def layout_shard(entries: Sequence[TensorEntry], metadata: Mapping[str, str]) -> ShardLayout:
    ordered = tuple(sorted(entries, key=lambda e: (-itemsize(e.dtype), e.dtype, e.name)))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    relative: dict[str, int] = {}
    for e in ordered:
        if e.name in relative or e.name == "__metadata__":
            raise ValueError(f"tensor name {e.name!r} used twice in one shard")
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        relative[e.name] = offset
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    prefix = len(raw).to_bytes(8, "little") + raw
    starts = {name: len(prefix) + rel for name, rel in relative.items()}
    return ShardLayout(prefix, ordered, starts, len(prefix) + offset)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.ms2hf-partial")


class ShardWriter:
    """One output file being written: ``write`` pieces at any position, then ``commit``."""

    def __init__(self, path: str | os.PathLike[str], layout: ShardLayout) -> None:
        self.path = Path(path)
        self.layout = layout
        self.temporary = temporary_name(self.path)
        try:
            self._fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _write_all(self._fd, layout.header, 0, self.temporary)
        except OSError as e:
            raise OutputError(f"{self.temporary}: cannot write: {e.strerror or e}") from e

    def write(self, name: str, offset: int, data: np.ndarray | bytes | memoryview) -> None:
        """Write bytes of tensor ``name`` starting ``offset`` bytes into that tensor."""
        _write_all(self._fd, memoryview(data).cast("B"), self.layout.starts[name] + offset, self.temporary)

    def commit(self) -> None:
        """Make the file durable, then give it its final name."""
        try:
            os.ftruncate(self._fd, self.layout.size)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.temporary, self.path)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot finish writing: {e.strerror or e}") from e

    def abort(self) -> None:
        """Drop the partial file: nothing with a final name was written."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.temporary.unlink()
        except FileNotFoundError:
            pass


def _write_all(fd: int, data: bytes | memoryview, position: int, path: Path) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, position)
        except OSError as e:
            raise OutputError(f"{path}: write failed: {e.strerror or e}") from e
        view = view[n:]
        position += n


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str], metadata: Mapping[str, str], dtypes: Mapping[str, str]
) -> None:
    """Write whole in-memory arrays (small files: the generator, hyper-parameters)."""
    entries = [TensorEntry(name, dtypes[name], tuple(a.shape)) for name, a in tensors.items()]
    writer = ShardWriter(path, layout_shard(entries, metadata))
    try:
        for name, array in tensors.items():
            expected = to_numpy(dtypes[name])
            if array.dtype != expected:
                raise ValueError(f"{name}: array is {array.dtype}, declared {dtypes[name]}")
            writer.write(name, 0, np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
