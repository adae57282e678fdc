"""Producing any band of an output tensor's rows straight from the source blocks that hold them.

Each source block is a memory-mapped slice of a rank file; each output piece is a strided run of
source rows (or a transposed window). For a band of output rows we intersect the piece with every
block and copy each intersection once, casting on the way, into the caller's buffer. No source
tensor is ever assembled whole and no concatenation is made, so memory is the band, nothing more.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ms2hf.io.dtypes import to_numpy
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.sources.plan import Block, SourceParam
from ms2hf.transforms.casts import cast_into, cast_transposed_into
from ms2hf.transforms.pieces import OutputTensor, Piece


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """Every tensor is handled as rows x columns: dim 0, and the product of the rest."""
    if not shape:
        return 1, 1
    cols = 1
    for d in shape[1:]:
        cols *= d
    return shape[0], cols


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _strided_span(
    start: int, step: int, lo: int, hi: int, first: int, last: int
) -> tuple[int, int]:
    """Indices i in [first, last) with ``lo <= start + step * i < hi``, as a half-open range."""
    i0 = max(first, _ceil_div(lo - start, step))
    i1 = min(last, _ceil_div(hi - start, step))
    return i0, max(i0, i1)


def _block_matrix(files: MappedFiles, block: Block, dtype: np.dtype) -> np.ndarray:
    rows, cols = _as_matrix(block.shape)
    return files.view(block.path, block.start, dtype, block.shape).reshape(rows, cols)


def _fill_piece(
    dst: np.ndarray,
    piece: Piece,
    first: int,
    last: int,
    param: SourceParam,
    files: MappedFiles,
) -> None:
    """Fill ``dst`` (output rows ``first..last`` of ``piece``, as a matrix) from every block."""
    dtype = to_numpy(param.dtype)
    for block in param.blocks:
        br0 = block.offsets[0] if block.offsets else 0
        bc0 = block.offsets[1] if len(block.offsets) > 1 else 0
        brows, bcols = _as_matrix(block.shape)
        if piece.transpose:
            # output row i <- source column col_start + i; output column j <- source row j
            c0 = max(piece.col_start + first, bc0)
            c1 = min(piece.col_start + last, bc0 + bcols)
            j0, j1 = _strided_span(
                piece.row_start, piece.row_step, br0, br0 + brows, 0, piece.row_count
            )
            if c0 >= c1 or j0 >= j1:
                continue
            src = _block_matrix(files, block, dtype)
            r0 = piece.row_start + piece.row_step * j0 - br0
            window = src[r0 : r0 + piece.row_step * (j1 - j0) : piece.row_step, c0 - bc0 : c1 - bc0]
            out_r0 = c0 - piece.col_start - first
            cast_transposed_into(dst[out_r0 : out_r0 + (c1 - c0), j0:j1], window)
        else:
            i0, i1 = _strided_span(piece.row_start, piece.row_step, br0, br0 + brows, first, last)
            c0 = max(piece.col_start, bc0)
            c1 = min(piece.col_stop, bc0 + bcols)
            if i0 >= i1 or c0 >= c1:
                continue
            src = _block_matrix(files, block, dtype)
            r0 = piece.row_start + piece.row_step * i0 - br0
            window = src[r0 : r0 + piece.row_step * (i1 - i0) : piece.row_step, c0 - bc0 : c1 - bc0]
            cast_into(
                dst[i0 - first : i1 - first, c0 - piece.col_start : c1 - piece.col_start], window
            )


def fill_rows(
    dst: np.ndarray, tensor: OutputTensor, row0: int, param: SourceParam, files: MappedFiles
) -> None:
    """Write output rows ``[row0, row0 + len(dst))`` of ``tensor`` into ``dst`` (rows x cols)."""
    row1 = row0 + dst.shape[0]
    base = 0
    for piece in tensor.pieces:
        lo, hi = max(row0, base), min(row1, base + piece.out_rows)
        if lo < hi:
            _fill_piece(dst[lo - row0 : hi - row0], piece, lo - base, hi - base, param, files)
        base += piece.out_rows


def row_bands(rows: int, row_bytes: int, max_bytes: int) -> Iterator[tuple[int, int]]:
    """Bands of whole rows, each at most ``max_bytes`` (at least one row)."""
    per_band = max(1, max_bytes // max(1, row_bytes))
    for start in range(0, rows, per_band):
        yield start, min(rows, start + per_band)


SCALE_DTYPE = np.dtype(np.float32)
"""A scaled tensor is assembled and multiplied in this dtype, then cast to its output dtype."""
_ALIGN = SCALE_DTYPE.itemsize


def _row_cost(tensor: OutputTensor, dtype: np.dtype) -> int:
    """Buffer bytes per output row: the row, and the fp32 row it is scaled in when scaled."""
    row = tensor.row_elements * dtype.itemsize
    return row + (tensor.row_elements * SCALE_DTYPE.itemsize if tensor.scale != 1.0 else 0)


def _slack(tensor: OutputTensor) -> int:
    """Room to align a scaled band's fp32 rows after its output rows."""
    return _ALIGN if tensor.scale != 1.0 else 0


def fit_row(buffer: np.ndarray, tensor: OutputTensor, dtype: np.dtype) -> np.ndarray:
    """``buffer``, or a larger one when a single row of ``tensor`` does not fit in it."""
    need = _row_cost(tensor, dtype) + _slack(tensor)
    return buffer if need <= len(buffer) else np.empty(need, np.uint8)


def assembled_bands(
    tensor: OutputTensor,
    dtype: np.dtype,
    buffer: np.ndarray,
    param: SourceParam,
    files: MappedFiles,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``tensor`` in bands of whole rows, each assembled into ``buffer`` (``fit_row``) in turn:
    ``(byte offset in the tensor, the band as rows x columns of dtype, its bytes)``. A band is
    valid until the next one is made. What convert writes and what verify recomputes are made
    by this one loop, so they cannot drift apart. A scaled tensor's band is assembled in fp32
    in the rest of the buffer, multiplied there, and cast once into the output band."""
    row_bytes = tensor.row_elements * dtype.itemsize
    cost = _row_cost(tensor, dtype)
    for r0, r1 in row_bands(tensor.rows, cost, len(buffer) - _slack(tensor)):
        raw = buffer[: (r1 - r0) * row_bytes]
        band = raw.view(dtype).reshape(r1 - r0, tensor.row_elements)
        if tensor.scale == 1.0:
            fill_rows(band, tensor, r0, param, files)
        else:
            at = -(-len(raw) // _ALIGN) * _ALIGN
            wide_bytes = buffer[at : at + (r1 - r0) * tensor.row_elements * _ALIGN]
            wide = wide_bytes.view(SCALE_DTYPE).reshape(band.shape)
            fill_rows(wide, tensor, r0, param, files)
            with np.errstate(over="ignore"):  # overflow is reported by the finiteness check
                np.multiply(wide, SCALE_DTYPE.type(tensor.scale), out=wide)
            cast_into(band, wide)
        yield r0 * row_bytes, band, raw
