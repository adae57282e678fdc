"""Output dtypes and the casts into them (``docs/casts.md``).

numpy's cast into ``ml_dtypes.bfloat16`` is round-to-nearest-even on the bit pattern and keeps
NaN a NaN, which is exactly the rule; fp16 is IEEE round-to-nearest-even with overflow to inf.
Casting through ``np.copyto`` writes straight into the output buffer, in numpy's small internal
chunks, so a cast never allocates a tensor-sized temporary.
"""

from __future__ import annotations

import numpy as np

from ms2hf.io.dtypes import FLOAT_DTYPES

TARGETS = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "source": None}


def output_dtype(source_dtype: str, target: str) -> str:
    """The safetensors dtype an output tensor gets; non-float tensors keep theirs."""
    if target not in TARGETS:
        raise ValueError(f"unknown dtype {target!r}; expected one of {', '.join(TARGETS)}")
    wanted = TARGETS[target]
    if wanted is None or source_dtype not in FLOAT_DTYPES:
        return source_dtype
    return wanted


def quiet_casts() -> np.errstate:
    """Overflow to inf is the rule's result, not a fault; the finiteness check reports it per
    tensor (``ms2hf.pipeline.engine.checks``), so numpy's own warning is silenced. Entered once
    around many casts (``copy_cast``, ``transposed_copy_cast``): entering it costs more than a
    small cast does."""
    return np.errstate(over="ignore")


def copy_cast(dst: np.ndarray, src: np.ndarray) -> None:
    """``cast_into``, for a caller inside ``quiet_casts``."""
    np.copyto(dst, src, casting="unsafe")


def cast_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy ``src`` into ``dst``, converting to ``dst``'s dtype (a byte copy when they match)."""
    with quiet_casts():
        copy_cast(dst, src)


TRANSPOSE_STRIP_BYTES = 1 << 20
"""Per strip of a transposed copy. numpy copies ``src.T`` element by element against the cache
(0.1-0.2 GB/s for an MoE expert); strips of source rows that stay in cache, each cast while still
contiguous, run 3-6 times faster. The scratch for the cast is at most this size."""


def cast_transposed_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst = src.T``, converted to ``dst``'s dtype, strip by strip of ``src`` rows."""
    with quiet_casts():
        transposed_copy_cast(dst, src)


def transposed_copy_cast(dst: np.ndarray, src: np.ndarray) -> None:
    """``cast_transposed_into``, for a caller inside ``quiet_casts``."""
    rows = max(8, TRANSPOSE_STRIP_BYTES // max(1, src.shape[1] * dst.dtype.itemsize))
    scratch = None
    if src.dtype != dst.dtype:
        scratch = np.empty((min(rows, src.shape[0]), src.shape[1]), dst.dtype)
    for r in range(0, src.shape[0], rows):
        strip = src[r : r + rows]
        if scratch is not None:
            strip = scratch[: len(strip)]
            copy_cast(strip, src[r : r + rows])
        dst[:, r : r + len(strip)] = strip.T
