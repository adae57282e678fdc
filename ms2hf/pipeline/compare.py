"""Comparing two byte ranges in bounded memory, for replica and verification checks."""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 4 * 2**20
"""The comparison's scratch is one boolean per byte of a chunk, never of a whole tensor."""


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """The index of the first byte where two equally long uint8 arrays differ, or None."""
    for at in range(0, a.size, CHUNK_BYTES):
        x, y = a[at : at + CHUNK_BYTES], b[at : at + CHUNK_BYTES]
        if not np.array_equal(x, y):
            return at + int(np.flatnonzero(x != y)[0])
    return None
