"""Deciding whether an output folder may be written into, without ever deleting user files."""

from __future__ import annotations

import os
from pathlib import Path

from ms2hf.errors import OutputError


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Create ``path`` if needed; refuse a non-empty folder unless ``overwrite``, which only
    ever replaces the files the run writes."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(
            f"{path}: folder is not empty; choose an empty or new folder, or pass --overwrite "
            "to replace the files this run writes (nothing else is touched)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create the output folder: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: output folder is not writable")
