"""safetensors dtype names and their numpy equivalents (BF16 and FP8 through ml_dtypes)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def itemsize(dtype: str) -> int:
    return NUMPY_DTYPES[dtype].itemsize


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor: what a safetensors header's data_offsets must span."""
    return math.prod(shape) * itemsize(dtype)


def to_numpy(dtype: str) -> np.dtype:
    return NUMPY_DTYPES[dtype]
