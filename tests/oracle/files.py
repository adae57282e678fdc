"""safetensors files read with the ``safetensors`` library itself, BF16 included.

``safetensors.numpy`` refuses BF16 (numpy has no such type), so the files are parsed by
``safetensors.deserialize``, which validates them and hands back raw bytes, and those bytes are
viewed with ``ml_dtypes``. Nothing here comes from ``ms2hf.io``.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import deserialize, safe_open

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as read-only numpy arrays of their stored dtype."""
    out: dict[str, np.ndarray] = {}
    for name, entry in deserialize(Path(path).read_bytes()):
        dtype = DTYPES[entry["dtype"]]
        out[name] = np.frombuffer(entry["data"], dtype).reshape(entry["shape"])
    return out


def read_dtypes(path: str | Path) -> dict[str, str]:
    """Every tensor's safetensors dtype name (``F32``, ``BF16``, ...)."""
    return {name: entry["dtype"] for name, entry in deserialize(Path(path).read_bytes())}


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def read_folder(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of every ``*.safetensors`` file in a folder (a Hugging Face checkpoint)."""
    out: dict[str, np.ndarray] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(read_tensors(path))
    return out
