"""The small files beside the shards: the index and config.json, written atomically.

The index goes last: loaders find shards through it, so its presence means the set is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ms2hf.errors import OutputError

HF_INDEX = "model.safetensors.index.json"


def write_json(path: Path, doc: Any) -> None:
    """Write JSON under a temporary name, make it durable, then rename it into place."""
    temporary = path.with_name(f".{path.name}.ms2hf-partial")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e


def index_document(
    weight_map: Mapping[str, str], total_size: int, total_parameters: int | None = None
) -> dict[str, Any]:
    metadata: dict[str, int] = {"total_size": total_size}
    if total_parameters is not None:
        metadata["total_parameters"] = total_parameters
    return {"metadata": metadata, "weight_map": dict(weight_map)}
