"""The LoRA merge of a band of rows, bit-exact to the rule, at the speed of a matrix product.

The rule (``docs/lora.md#3-the-merged-model``): ``float32(W + s * acc)`` in float64, where
``acc = sum_k B[:, k] * A[k, :]`` is summed in ascending ``k``. Looping over ``k`` elementwise
costs ``2r`` passes over every band; a BLAS product is far cheaper but sums in an order of its
own. So the product is used with a certificate instead of being trusted:

- ``M = B @ (s * A)`` in any order. Any order of summing ``r`` terms errs by at most
  ``r * 2**-53`` times the sum of their magnitudes, and so does the rule's own sum; scaling
  ``A`` first and rounding ``s * acc`` cost a few ulps more. With ``c = (4r + 8) * 2**-53``,
  ``D = c * max_i sum_k |B[i, k]| * max_j |s * A[k, j]|`` bounds, with room to spare, how far
  ``M`` and the rule's ``fl(s * acc)`` can be apart anywhere in the band.
- So the rule's ``fl(s * acc)`` lies in ``[fl(M - D), fl(M + D)]``, and because rounding is
  monotonic, its result lies between ``float32(W + fl(M - D))`` and ``float32(W + fl(M + D))``.
  Where those two are the same nonzero float32, that is the rule's result, bit for bit.
- Elsewhere (a value within a few float64 ulps of a float32 rounding boundary: with weights of
  ordinary size about one element in a million; a zero, whose sign the bounds cannot tell; NaN
  or inf in the operands) the element is recomputed by the rule itself, in the fixed order.

Operands are float64 arrays the caller filled (every stored dtype converts exactly); what
depends on ``A`` alone is prepared once per tensor (``prepare``), and so is the scratch
(``Work``), from the caller's allocator, so that a worker's band buffer holds all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Allocate = Callable[[tuple[int, ...], type], np.ndarray]
"""``allocate(shape, dtype)``: an uninitialised array (``numpy.empty`` or a carved buffer)."""

F64, F32 = np.float64, np.float32
ELEMENT_WORK_BYTES = 2 * 8 + 4 + 2
"""Scratch per element of a band: ``M`` and a float64 temporary, the upper bound in float32, two
masks."""


def work_bytes(rows: int, cols: int, rank: int) -> int:
    """What ``Work.allocate`` takes for bands of ``rows`` x ``cols`` (alignment aside)."""
    return rows * cols * ELEMENT_WORK_BYTES + rows * (rank + 1) * 8


@dataclass(frozen=True)
class Work:
    """Scratch for ``merge_rows``, made once for every band of a tensor (of at most ``rows``
    rows): a band's numpy calls then allocate nothing."""

    m: np.ndarray
    low: np.ndarray
    high: np.ndarray
    unsure: np.ndarray
    zero: np.ndarray
    b_abs: np.ndarray
    bound: np.ndarray

    @classmethod
    def allocate(cls, rows: int, cols: int, rank: int, allocate: Allocate = np.empty) -> Work:
        return cls(
            m=allocate((rows, cols), F64),
            low=allocate((rows, cols), F64),
            high=allocate((rows, cols), F32),
            unsure=allocate((rows, cols), np.bool_),
            zero=allocate((rows, cols), np.bool_),
            b_abs=allocate((rows, rank), F64),
            bound=allocate((rows, 1), F64),
        )


def prepared_bytes(cols: int, rank: int) -> int:
    """What ``prepare`` allocates for ``cols`` columns of ``A`` (alignment aside)."""
    return cols * rank * 8 + rank * 8  # s * A, and the peak per rank


@dataclass(frozen=True)
class Prepared:
    """What the merge needs of ``A`` and ``s``, made once for all the bands of a tensor."""

    a: np.ndarray
    """``A`` itself, for the elements recomputed in the fixed order."""
    scaled: np.ndarray
    """``s * A``: the product's operand."""
    peak: np.ndarray
    """``c * max_j |s * A[k, j]|`` per rank ``k``: the bound's factor."""
    scale: float


def prepare(a: np.ndarray, scale: float, allocate: Allocate = np.empty) -> Prepared:
    """``a`` (float64, ``[r, cols]``) made ready for ``merge_rows``."""
    rank, cols = a.shape
    with np.errstate(all="ignore"):
        scaled = allocate((rank, cols), F64)
        np.multiply(a, scale, out=scaled)
        peak = allocate((rank,), F64)
        if cols:  # the largest magnitude, by reductions that allocate no [r, cols] temporary
            np.maximum(scaled.max(axis=1), -scaled.min(axis=1), out=peak)
        else:
            peak.fill(0.0)
        peak *= (4 * rank + 8) * 2.0**-53
    return Prepared(a, scaled, peak, scale)


def fixed_order(w: np.ndarray, b: np.ndarray, a: np.ndarray, scale: float) -> np.ndarray:
    """The rule itself for ``n`` elements: ``w`` ``[n]``, ``b`` ``[n, r]`` (each element's row of
    ``B``), ``a`` ``[r, n]`` (its column of ``A``); float32 results."""
    acc = b[:, 0] * a[0]
    for k in range(1, b.shape[1]):
        acc = acc + b[:, k] * a[k]
    result: np.ndarray = (w + scale * acc).astype(F32)
    return result


def merge_rows(out: np.ndarray, w: np.ndarray, b: np.ndarray, a: Prepared, work: Work) -> None:
    """``out`` (float32, ``[rows, cols]``, any strides) = the rule applied to ``w`` ``[rows,
    cols]``, ``b`` ``[rows, r]`` (float64) and ``a`` (``prepare``). One bound serves the band:
    the largest of its rows' (a looser bound only sends a few more elements to the fixed order),
    so that it is a scalar to numpy."""
    rows, cols = w.shape
    m, low, high = work.m[:rows, :cols], work.low[:rows, :cols], work.high[:rows, :cols]
    unsure, zero = work.unsure[:rows, :cols], work.zero[:rows, :cols]
    with np.errstate(all="ignore"):  # inf and NaN go to the fixed order below
        b_abs, bound = work.b_abs[:rows], work.bound[:rows]
        np.abs(b, out=b_abs)
        np.matmul(b_abs, a.peak[:, None], out=bound)
        d = float(bound.max())
        np.matmul(b, a.scaled, out=m)
        np.subtract(m, d, out=low)
        low += w
        np.copyto(out, low, casting="unsafe")
        m += d
        m += w
        np.copyto(high, m, casting="unsafe")
        np.not_equal(out, high, out=unsure)
        np.equal(out, 0, out=zero)
        unsure |= zero
        if unsure.any():  # rare: look for where only then
            i, j = np.divmod(np.flatnonzero(unsure), cols)
            out[i, j] = fixed_order(w[i, j], b[i], a.a[:, j], a.scale)
