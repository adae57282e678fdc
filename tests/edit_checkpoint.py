"""Copying a fixture and damaging the copy in precise ways, for error, resume and fuzz tests.

The fixtures in tests/data are never modified: everything here works on a copy in a tmp folder.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ms2hf.io.dtypes import NUMPY_DTYPES
from ms2hf.io.safetensors_reader import SafetensorsHeader
from ms2hf.io.safetensors_writer import save_file
from tests.conftest import DATA, load_tensors


def copy_fixture(fixture: str | Path, dest: Path) -> Path:
    """``checkpoint/`` and ``strategy/`` of a fixture (a name in tests/data, or the fixture's
    own folder), copied to ``dest``."""
    source = DATA / fixture  # a folder's absolute path stays as it is
    for part in ("checkpoint", "strategy"):
        shutil.copytree(source / part, dest / part)
    return dest


def rank_file(root: Path, rank: int) -> Path:
    (path,) = (root / "checkpoint" / f"rank_{rank}").glob("*.safetensors")
    return path


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file as its header (parsed) and its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(path: Path, header_json: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change a file's header in place, keeping its data bytes as they are."""
    header, data = split(path)
    edit(header)
    join(path, json.dumps(header).encode(), data)


def edit_tensors(path: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Rewrite a file whole after changing its tensors (added, removed or altered)."""
    header = SafetensorsHeader(path)
    tensors = {name: array.copy() for name, array in load_tensors(path).items()}
    dtypes = {name: info.dtype for name, info in header.tensors.items()}
    edit(tensors)
    names = {dtype: name for name, dtype in NUMPY_DTYPES.items()}
    save_file(
        tensors,
        path,
        header.metadata,
        {n: dtypes.get(n, names[a.dtype]) for n, a in tensors.items()},
    )


NAN_PARAM = "decoder.layers.2.mlp.linear_fc2.weight"
"""The parameter ``nan_copy`` puts its NaN in (Hugging Face's model.layers.2.mlp.down_proj)."""


def nan_copy(dest: Path) -> Path:
    """tiny_fp32 copied to ``dest`` with one NaN: ``NAN_PARAM[5, 7]`` in rank 2's file."""
    root = copy_fixture("tiny_fp32", dest)

    def poison(tensors: dict[str, np.ndarray]) -> None:
        tensors[NAN_PARAM][5, 7] = np.nan

    edit_tensors(rank_file(root, 2), poison)
    return root
