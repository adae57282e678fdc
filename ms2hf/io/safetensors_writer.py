"""A streaming safetensors writer: the header first, from names, dtypes and shapes alone, then
each tensor's bytes at its known offset, in as many pieces and from as many threads as wanted.

The file is written under a temporary name and renamed only when every byte is in place, so a
file with the final name is always complete. Each tensor is checksummed as its bytes go by, so
committing a file also yields its content digest (``ms2hf.io.shard_digest``) without reading it
back; that is what lets an interrupted run trust, after checking, the files it already finished.
Written bytes go to the disk as they are written (``ms2hf.io.writeback``), not all at ``fsync``.
Tensors are ordered as the reference writer orders them (wider dtypes first, then by name), with
compact JSON padded to a multiple of 8 bytes.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ms2hf.errors import OutputError
from ms2hf.io import shard_digest
from ms2hf.io.dtypes import itemsize, nbytes, to_numpy
from ms2hf.io.writeback import WriteBehind


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @cached_property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


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
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        relative[e.name] = offset
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    prefix = len(raw).to_bytes(8, "little") + raw
    starts = {name: len(prefix) + rel for name, rel in relative.items()}
    return ShardLayout(prefix, ordered, starts, len(prefix) + offset)


PARTIAL_SUFFIX = ".ms2hf-partial"


def temporary_name(path: Path, attempt: str = "") -> Path:
    """Where ``path`` is written until complete: hidden, and never matching ``*.safetensors``;
    with ``attempt``, a name no other attempt at the same file uses (hosts writing into a shared
    folder, a retried task while the first attempt may still run)."""
    tag = f".{attempt}" if attempt else ""
    return path.with_name(f".{path.name}{tag}{PARTIAL_SUFFIX}")


class ShardWriter:
    """One output file being written: each tensor's bytes front to back (tensors in any order,
    from any thread), then ``commit``."""

    def __init__(
        self, path: str | os.PathLike[str], layout: ShardLayout, attempt: str = ""
    ) -> None:
        self.path = Path(path)
        self.layout = layout
        self.temporary = temporary_name(self.path, attempt)
        self._written = dict.fromkeys(layout.starts, 0)
        self._checksums: dict[str, shard_digest.TensorChecksum] = {}
        """Running checksums of tensors written in pieces, made on their first piece."""
        self._sums: dict[str, int] = {}
        """Checksums of tensors written whole at once (``write_run``)."""
        try:
            self._fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise OutputError(
                f"{self.path}: cannot create {self.temporary.name}: {e.strerror or e}"
            ) from e
        self._behind = WriteBehind(self._fd)
        self._one_writer = threading.Lock()
        """The kernel lets one buffered write into a file proceed at a time (the inode lock),
        and a writer waiting for it there spins on a CPU that the other workers need; waiting
        here, it sleeps. (Converting the 0.6B benchmark workload: 1.6 s instead of 1.8 s.)"""
        try:
            self._write_at(layout.header, 0)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, offset: int, data: np.ndarray | bytes | memoryview) -> None:
        """Write the next bytes of tensor ``name``, which start ``offset`` bytes into it."""
        if offset != self._written[name]:
            raise ValueError(f"{name}: bytes written at {offset}, expected {self._written[name]}")
        view = memoryview(data).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
        checksum = self._checksums.get(name)
        if checksum is None:
            checksum = self._checksums[name] = shard_digest.TensorChecksum()
        checksum.update(view)
        self._written[name] += len(view)
        self._write_at(view, self.layout.starts[name] + offset)
        self._behind.written(self.layout.starts[name] + offset, len(view))

    def write_run(self, names: Sequence[str], sizes: Sequence[int], data: np.ndarray) -> None:
        """Write whole tensors that follow each other in the file, none written yet, with one
        write: ``data`` is their bytes one after the other, ``sizes`` their byte counts. Many
        small tensors (an MoE layer's experts) cost one system call instead of one each."""
        view = memoryview(data).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
        position = self.layout.starts[names[0]]
        at = 0
        for name, size in zip(names, sizes):
            begun = self._written[name] or name in self._sums or name in self._checksums
            if begun or self.layout.starts[name] != position + at:
                raise ValueError(f"{name}: not the next unwritten tensor of the run")
            self._sums[name] = shard_digest.checksum(view[at : at + size])
            self._written[name] = size
            at += size
        if at != len(view):
            raise ValueError(f"{names[0]}...: {len(view)} bytes given for {at}")
        self._write_at(view, position)
        self._behind.written(position, len(view))

    def _write_at(self, data: bytes | memoryview, position: int) -> None:
        view = memoryview(data)
        try:
            with self._one_writer:
                while view:
                    n = os.pwrite(self._fd, view, position)
                    view = view[n:]
                    position += n
        except OSError as e:
            raise OutputError(
                f"{self.path}: write failed: {e.strerror or e} (output disk full, or a file size "
                "limit?); nothing is left under this name"
            ) from e

    def commit(self) -> str:
        """Make the file durable, give it its final name, and return its content digest."""
        short = [e.name for e in self.layout.entries if self._written[e.name] != e.nbytes]
        if short:
            raise ValueError(f"{self.path}: tensor {short[0]} is not fully written")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.temporary, self.path)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot finish writing: {e.strerror or e}") from e
        return shard_digest.combine(
            self.layout.header,
            ((e.name, e.nbytes, self._checksum(e.name)) for e in self.layout.entries),
        )

    def _checksum(self, name: str) -> int:
        found = self._sums.get(name)
        if found is not None:
            return found
        running = self._checksums.get(name)
        return shard_digest.TensorChecksum().value if running is None else running.value

    def abort(self) -> None:
        """Drop the partial file: nothing with a final name was written."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.temporary.unlink()
        except FileNotFoundError:
            pass


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str],
    dtypes: Mapping[str, str],
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
