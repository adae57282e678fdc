"""A run's fingerprint: what decides its bytes, hashed, so that a rerun knows whether the files
an interrupted run left are its own (``ms2hf.pipeline.engine.output_dir``)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping, Sequence

from ms2hf.errors import FormatError
from ms2hf.io.sources.plan import SourceParam
from ms2hf.pipeline.plan import PlannedFile


class RealPaths:
    """``os.path.realpath`` (what ``Path.resolve`` gives) of many files in few folders: each
    folder is resolved once, and a file costs nothing more than the ``lstat`` its caller made
    anyway, not one per component of its path (28,672 for the 4096 rank files of a save)."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}

    def folder(self, path: str) -> str:
        found = self._known.get(path)
        if found is None:
            found = self._known[path] = self.file(path, os.path.islink(path))
        return found

    def file(self, path: str, link: bool) -> str:
        """The real path of ``path``, which its ``lstat`` says is a symbolic link or not."""
        parent, name = os.path.split(path)
        if link or not parent or parent == path or name in ("", ".", ".."):
            return os.path.realpath(path)
        return os.path.join(self.folder(parent), name)


def fingerprint(
    files: Sequence[PlannedFile],
    params: Mapping[str, SourceParam],
    metadata: Mapping[str, str],
    check: object,
) -> str:
    """Every output tensor's recipe, the source blocks it reads, and the identity (real path,
    size, modification time) of every source file. Recipes and blocks are described by their
    ``repr`` (frozen dataclasses and tuples of ints and strings: exact), fed to the hash as they
    are made rather than gathered into one document first (a 4096-rank save's plan reads
    100,000 blocks)."""
    used = sorted({name for f in files for t in f.tensors for name in t.tensor.sources})
    paths = sorted({b.path for name in used for b in params[name].blocks})
    where = {path: i for i, path in enumerate(paths)}
    real = RealPaths()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((sorted(metadata.items()), repr(check))).encode())
    for path in paths:
        try:
            st = os.lstat(path)  # one call for the link test and, for a file, its identity
            link = stat.S_ISLNK(st.st_mode)
            if link:
                st = os.stat(path)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
        h.update(repr((real.file(str(path), link), st.st_size, st.st_mtime_ns)).encode())
    for f in files:
        h.update(repr((f.name, [(t.dtype, t.tensor) for t in f.tensors])).encode())
    for name in used:
        p = params[name]
        blocks = [(where[b.path], b.start, b.offsets, b.shape) for b in p.blocks]
        h.update(repr((name, p.dtype, p.shape, blocks)).encode())
    return h.hexdigest()
