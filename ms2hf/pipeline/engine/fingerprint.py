"""A run's fingerprint: what decides its bytes, hashed, so that a rerun knows whether the files
an interrupted run left are its own (``ms2hf.pipeline.engine.output_dir``)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ms2hf.errors import FormatError
from ms2hf.io.sources.plan import SourceParam
from ms2hf.pipeline.plan import PlannedFile


def fingerprint(
    files: Sequence[PlannedFile],
    params: Mapping[str, SourceParam],
    metadata: Mapping[str, str],
    check: object,
) -> str:
    """Every output tensor's recipe, the source blocks it reads, and the identity (size,
    modification time) of every source file. A recipe is described by its ``repr`` (frozen
    dataclasses of ints, strings and tuples: exact, and ten times cheaper than
    ``dataclasses.astuple`` on a plan of 37,000 tensors)."""
    used = sorted({name for f in files for t in f.tensors for name in t.tensor.sources})
    where: dict[Path, str] = {}
    stats: dict[str, list[int]] = {}
    for path in {b.path for name in used for b in params[name].blocks}:
        try:
            st = os.stat(path)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
        where[path] = str(path.resolve())
        stats[where[path]] = [st.st_size, st.st_mtime_ns]
    doc = {
        "metadata": dict(metadata),
        "check": repr(check),
        "files": [[f.name, [[t.dtype, repr(t.tensor)] for t in f.tensors]] for f in files],
        "sources": {
            name: [
                params[name].dtype,
                params[name].shape,
                [[where[b.path], b.start, b.offsets, b.shape] for b in params[name].blocks],
            ]
            for name in used
        },
        "stats": stats,
    }
    return hashlib.blake2b(json.dumps(doc, sort_keys=True).encode(), digest_size=16).hexdigest()
