"""Output dtypes and the casts into them (SPEC section 6).

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


def cast_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy ``src`` into ``dst``, converting to ``dst``'s dtype (a byte copy when they match)."""
    np.copyto(dst, src, casting="unsafe")
