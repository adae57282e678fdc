"""NaN and inf in the weights, found as they are written, for a small fraction of the copy's cost.

A non-finite weight makes a model generate garbage, and a cast can make one (fp32 values above
65504 overflow fp16). The check runs on every output band after the cast, so it sees exactly what
is written. It tests bit patterns, not values: a float is NaN or inf exactly when its exponent
bits are all ones, i.e. when its magnitude bits reach the pattern of +inf. One integer pass per
chunk (mask, then max) decides that for every float dtype alike, BF16 included, where numpy's own
``isfinite`` runs through a slow generic loop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from ms2hf.errors import ModelError
from ms2hf.pipeline.execute import PlannedTensor

log = logging.getLogger("ms2hf")

# dtype -> (unsigned view, magnitude mask, smallest non-finite magnitude)
_PATTERNS: dict[str, tuple[type[np.unsignedinteger], int, int]] = {
    "F64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7F, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F, 0x7F),  # no inf; NaN is S.1111.111
}
CHUNK_ELEMENTS = 1 << 18
"""Small enough for the scratch chunk to stay in cache."""


def has_nonfinite(values: np.ndarray, dtype: str) -> bool:
    """Whether ``values`` (of safetensors dtype ``dtype``) hold a NaN or an inf."""
    pattern = _PATTERNS.get(dtype)
    if pattern is None:
        return False  # integers and booleans are always finite
    unsigned, mask, threshold = pattern
    bits = values.reshape(-1).view(unsigned)
    scratch = np.empty(min(CHUNK_ELEMENTS, bits.size), unsigned)
    for at in range(0, bits.size, CHUNK_ELEMENTS):
        chunk = bits[at : at + CHUNK_ELEMENTS]
        part = scratch[: chunk.size]
        np.bitwise_and(chunk, unsigned(mask), out=part)
        if part.max() >= threshold:
            return True
    return False


@dataclass(frozen=True)
class FiniteCheck:
    """The band check of ``write_files``: warn once per tensor, or fail when ``strict``."""

    strict: bool
    _warned: set[str] = field(default_factory=set, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __call__(self, planned: PlannedTensor, band: np.ndarray) -> None:
        if not has_nonfinite(band, planned.dtype):
            return
        tensor = planned.tensor
        what = (
            f"tensor {tensor.name!r} (from parameter {tensor.source!r}, written as "
            f"{planned.dtype}) contains NaN or inf values"
        )
        if self.strict:
            raise ModelError(f"{what}; --strict refuses non-finite weights")
        with self._lock:
            if tensor.name in self._warned:
                return
            self._warned.add(tensor.name)
        log.warning("warning: %s (--strict makes this an error)", what)
