"""Producing any band of an output tensor's rows straight from the source blocks that hold them.

Each source block is a memory-mapped slice of a rank file; each output piece is a strided run of
source rows (or a transposed window). For a band of output rows we intersect the piece with the
blocks that hold those rows (found through the parameter's ``BlockIndex``, not by scanning all of
them) and copy each intersection once, casting on the way, into the caller's buffer. No source
tensor is ever assembled whole and no concatenation is made, so memory is the band, nothing more.

A fine-tuned weight (an output tensor with a LoRA delta) is made the same way, in float64: its
base rows, its rows of ``lora_B`` and the columns of ``lora_A`` are filled from their blocks,
merged (``ms2hf.transforms.lora_merge``), rounded once to float32 and then cast. The float64 work
arrays are carved out of the same buffer, a band of fewer rows (and, for a very wide ``lora_A``,
of a window of columns at a time), so memory is still the one buffer.

Many small tensors of one parameter (an MoE layer's 384 experts cut from two grouped weights)
would each visit the parameter's blocks and maps again; the engine instead stages such a
parameter, cast whole into part of its buffer (``stage``), and cuts each tensor from that
(``StagedSource``): the same bytes, since a cast is element by element.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import TypeAlias, cast

import numpy as np

from ms2hf.io.dtypes import to_numpy
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.sources.plan import SourceParam, Tile, as_matrix
from ms2hf.transforms.casts import cast_into, copy_cast, quiet_casts, transposed_copy_cast
from ms2hf.transforms.lora_merge import (
    F32,
    F64,
    Prepared,
    Work,
    merge_rows,
    prepare,
    prepared_bytes,
    work_bytes,
)
from ms2hf.transforms.pieces import LoraDelta, OutputTensor, Piece


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


ALIGN = 64
"""Arrays carved out of a worker's buffer (staged parameters, a merge's operands and work)
start at multiples of this: a cache line, for SIMD loads."""


def aligned(n: int, to: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``to``."""
    return _ceil_div(n, to) * to


def _strided_span(
    start: int, step: int, lo: int, hi: int, first: int, last: int
) -> tuple[int, int]:
    """Indices i in [first, last) with ``lo <= start + step * i < hi``, as a half-open range."""
    i0 = max(first, _ceil_div(lo - start, step))
    i1 = min(last, _ceil_div(hi - start, step))
    return i0, max(i0, i1)


class MappedSource:
    """A parameter's blocks, viewed through memory maps as they are needed."""

    def __init__(self, param: SourceParam, files: MappedFiles) -> None:
        self.dtype = to_numpy(param.dtype)
        self.covering = param.block_index.covering
        self._files = files

    def matrix(self, tile: Tile) -> np.ndarray:
        block, _, rows, _, cols = tile
        view = self._files.view(block.path, block.start, self.dtype, block.shape)
        return view.reshape(rows, cols)


class StagedSource:
    """A parameter already assembled in memory, as rows x columns (``stage``): one block."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.dtype = matrix.dtype
        self.values = matrix
        self._tiles = (cast(Tile, (None, 0, matrix.shape[0], 0, matrix.shape[1])),)

    def covering(self, row0: int, row1: int, col0: int, col1: int) -> tuple[Tile, ...]:
        return self._tiles

    def matrix(self, tile: Tile) -> np.ndarray:
        return self.values

    def cut(self, dst: np.ndarray, piece: Piece, first: int, last: int) -> None:
        """``_fill_piece`` from the one block that is the whole matrix, already in ``dst``'s
        dtype: the piece's window, sliced and copied at once."""
        step, start = piece.row_step, piece.row_start
        if piece.transpose:
            cols = slice(piece.col_start + first, piece.col_start + last)
            dst[...] = self.values[start : start + step * piece.row_count : step, cols].T
        else:
            rows = slice(start + step * first, start + step * last, step)
            dst[...] = self.values[rows, piece.col_start : piece.col_stop]


Source: TypeAlias = MappedSource | StagedSource


def _fill_piece(dst: np.ndarray, piece: Piece, first: int, last: int, source: Source) -> None:
    """Fill ``dst`` (output rows ``first..last`` of ``piece``, as a matrix) from the blocks
    that hold them (callers are inside ``quiet_casts``)."""
    if type(source) is StagedSource and source.dtype == dst.dtype and piece.row_step > 0:
        source.cut(dst, piece, first, last)
        return
    step = piece.row_step
    if piece.transpose:
        # output row i <- source column col_start + i; output column j <- source row j
        rows, cols = (0, piece.row_count), (piece.col_start + first, piece.col_start + last)
    else:
        rows, cols = (first, last), (piece.col_start, piece.col_stop)
    if rows[0] >= rows[1] or cols[0] >= cols[1]:
        return
    ends = (piece.row_start + step * rows[0], piece.row_start + step * (rows[1] - 1))
    for tile in source.covering(min(ends), max(ends) + 1, *cols):
        _, br0, brows, bc0, bcols = tile
        if piece.transpose:
            c0 = max(piece.col_start + first, bc0)
            c1 = min(piece.col_start + last, bc0 + bcols)
            j0, j1 = _strided_span(piece.row_start, step, br0, br0 + brows, 0, piece.row_count)
            if c0 >= c1 or j0 >= j1:
                continue
            src = source.matrix(tile)
            r0 = piece.row_start + step * j0 - br0
            window = src[r0 : r0 + step * (j1 - j0) : step, c0 - bc0 : c1 - bc0]
            out_r0 = c0 - piece.col_start - first
            transposed_copy_cast(dst[out_r0 : out_r0 + (c1 - c0), j0:j1], window)
        else:
            i0, i1 = _strided_span(piece.row_start, step, br0, br0 + brows, first, last)
            c0 = max(piece.col_start, bc0)
            c1 = min(piece.col_stop, bc0 + bcols)
            if i0 >= i1 or c0 >= c1:
                continue
            src = source.matrix(tile)
            r0 = piece.row_start + step * i0 - br0
            window = src[r0 : r0 + step * (i1 - i0) : step, c0 - bc0 : c1 - bc0]
            out_c0 = c0 - piece.col_start
            copy_cast(dst[i0 - first : i1 - first, out_c0 : out_c0 + (c1 - c0)], window)


def fill_rows_from(dst: np.ndarray, tensor: OutputTensor, row0: int, source: Source) -> None:
    """Write output rows ``[row0, row0 + len(dst))`` of ``tensor`` into ``dst`` (rows x cols),
    unscaled."""
    row1 = row0 + dst.shape[0]
    base = 0
    with quiet_casts():
        for piece in tensor.pieces:
            lo, hi = max(row0, base), min(row1, base + piece.out_rows)
            if lo < hi:
                _fill_piece(dst[lo - row0 : hi - row0], piece, lo - base, hi - base, source)
            base += piece.out_rows


def fill_rows(
    dst: np.ndarray, tensor: OutputTensor, row0: int, param: SourceParam, files: MappedFiles
) -> None:
    """Write output rows ``[row0, row0 + len(dst))`` of ``tensor`` into ``dst`` (rows x cols),
    unscaled, straight from ``param``'s blocks."""
    fill_rows_from(dst, tensor, row0, MappedSource(param, files))


def staged_bytes(param: SourceParam, dtype: np.dtype) -> int:
    rows, cols = as_matrix(param.shape)
    return rows * cols * dtype.itemsize


def stage(
    param: SourceParam, dtype: np.dtype, buffer: np.ndarray, files: MappedFiles
) -> StagedSource:
    """The whole of ``param`` cast to ``dtype`` in ``buffer`` (``staged_bytes`` of it), each
    block copied to its place: a source that many small output tensors of the parameter are
    then cut from without visiting its blocks, or mapping its files, again for each of them."""
    rows, cols = as_matrix(param.shape)
    matrix = buffer[: rows * cols * dtype.itemsize].view(dtype).reshape(rows, cols)
    source = MappedSource(param, files)
    with quiet_casts():
        for tile in source.covering(0, rows, 0, cols):
            _, r0, brows, c0, bcols = tile
            r1, c1 = min(rows, r0 + brows), min(cols, c0 + bcols)
            if r0 < r1 and c0 < c1:
                copy_cast(matrix[r0:r1, c0:c1], source.matrix(tile)[: r1 - r0, : c1 - c0])
    return StagedSource(matrix)


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
    """``buffer``, or a larger one when a single row of ``tensor`` (with a LoRA delta: a row and
    its merge's work arrays) does not fit in it."""
    if tensor.delta is not None:
        need = _MergeLayout.of(tensor, dtype, len(buffer)).bytes(1, 1)
    else:
        need = _row_cost(tensor, dtype) + _slack(tensor)
    return buffer if need <= len(buffer) else np.empty(need, np.uint8)


def assembled_bands(
    tensor: OutputTensor,
    dtype: np.dtype,
    buffer: np.ndarray,
    params: Mapping[str, SourceParam],
    files: MappedFiles,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``tensor`` in bands of whole rows, each assembled into ``buffer`` (``fit_row``) in turn:
    ``(byte offset in the tensor, the band as rows x columns of dtype, its bytes)``. A band is
    valid until the next one is made. What convert writes and what verify recomputes are made
    by this one loop, so they cannot drift apart. A scaled tensor's band is assembled in fp32
    in the rest of the buffer, multiplied there, and cast once into the output band; a
    fine-tuned weight's is merged (``_merged_bands``)."""
    if tensor.delta is not None:
        yield from _merged_bands(tensor, tensor.delta, dtype, buffer, params, files)
        return
    source = MappedSource(params[tensor.source], files)
    row_bytes = tensor.row_elements * dtype.itemsize
    cost = _row_cost(tensor, dtype)
    for r0, r1 in row_bands(tensor.rows, cost, len(buffer) - _slack(tensor)):
        raw = buffer[: (r1 - r0) * row_bytes]
        band = raw.view(dtype).reshape(r1 - r0, tensor.row_elements)
        if tensor.scale == 1.0:
            fill_rows_from(band, tensor, r0, source)
        else:
            at = aligned(len(raw), _ALIGN)
            wide_bytes = buffer[at : at + (r1 - r0) * tensor.row_elements * _ALIGN]
            wide = wide_bytes.view(SCALE_DTYPE).reshape(band.shape)
            fill_rows_from(wide, tensor, r0, source)
            with np.errstate(over="ignore"):  # overflow is reported by the finiteness check
                np.multiply(wide, SCALE_DTYPE.type(tensor.scale), out=wide)
            cast_into(band, wide)
        yield r0 * row_bytes, band, raw


class _Carve:
    """Arrays carved one after another out of a byte buffer, each aligned for SIMD loads."""

    def __init__(self, buffer: np.ndarray, start: int) -> None:
        self.buffer = buffer
        self.used = start

    def __call__(self, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        start = aligned(self.used)
        count = 1
        for d in shape:
            count *= d
        stop = start + count * np.dtype(dtype).itemsize
        if stop > len(self.buffer):
            raise AssertionError(f"band buffer of {len(self.buffer)} bytes overrun ({stop})")
        self.used = stop
        return self.buffer[start:stop].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class _MergeLayout:
    """How a fine-tuned tensor is cut: bands of output rows in half the buffer (few, large
    writes, as for any tensor), each merged a chunk of rows and a window of columns at a time
    in the other half, which holds the float64 operands and the merge's work. The buffer is
    larger than a band buffer (``MemoryBudget.merge_bytes``): each chunk costs a dozen numpy
    calls, and many short calls from two workers only pass the interpreter lock around."""

    cols: int
    rank: int
    itemsize: int
    width: int

    @classmethod
    def of(cls, tensor: OutputTensor, dtype: np.dtype, budget: int) -> _MergeLayout:
        assert tensor.delta is not None
        cols, rank = tensor.row_elements, tensor.delta.b.shape[1]
        width = cols
        while width > 1 and cls(cols, rank, dtype.itemsize, width).bytes(1, 1) > budget:
            width = -(-width // 2)  # a wide lora_A: a window of columns at a time
        return cls(cols, rank, dtype.itemsize, width)

    def band_bytes(self, rows: int) -> int:
        """An output band, aligned: the merge's arrays begin after it."""
        return aligned(rows * self.cols * self.itemsize)

    def chunk_bytes(self, rows: int) -> int:
        """``A``'s window prepared (``lora_merge.prepare``) with ``A`` itself, then for a chunk
        of rows ``B``, ``W`` and the float32 result, and the merge's work; with alignment slack
        for each array."""
        w, r = self.width, self.rank
        prepared = r * w * 8 + prepared_bytes(w, r)
        operands = rows * r * 8 + rows * w * 8 + rows * w * 4
        return prepared + operands + work_bytes(rows, w, r) + 16 * ALIGN

    def bytes(self, band_rows: int, chunk_rows: int) -> int:
        return self.band_bytes(band_rows) + self.chunk_bytes(chunk_rows)

    def rows(self, budget: int) -> tuple[int, int]:
        """Rows per output band (about half the buffer), and per merged chunk (the rest)."""
        band = max(1, budget // 2 // (self.cols * self.itemsize))
        while band > 1 and self.bytes(band, 1) > budget:
            band //= 2  # a small buffer: room for the merge first
        room = budget - self.band_bytes(band) - self.chunk_bytes(0)
        chunk = max(1, room // (self.chunk_bytes(1) - self.chunk_bytes(0)))
        return band, min(band, chunk)


def _columns(tensor: OutputTensor, c0: int, c1: int) -> OutputTensor:
    """Columns ``[c0, c1)`` of a tensor made of whole-column row pieces."""
    pieces = tuple(
        dataclasses.replace(p, col_start=p.col_start + c0, col_stop=p.col_start + c1)
        for p in tensor.pieces
    )
    return OutputTensor(tensor.name, tensor.source, (tensor.rows, c1 - c0), pieces)


def _merged_bands(
    tensor: OutputTensor,
    delta: LoraDelta,
    dtype: np.dtype,
    buffer: np.ndarray,
    params: Mapping[str, SourceParam],
    files: MappedFiles,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Bands of a fine-tuned weight (``docs/lora.md#3-the-merged-model``): per chunk of rows and
    window of columns, ``W`` and ``B`` rows and ``A`` columns filled in float64 (exact for every
    stored dtype), merged into float32, then cast into the band as any float32 tensor is. The
    work arrays are carved once for the tensor; ``A`` is prepared once too when it fits in one
    window."""
    layout = _MergeLayout.of(tensor, dtype, len(buffer))
    cols, rank, width = layout.cols, layout.rank, layout.width
    row_bytes = cols * dtype.itemsize
    per_band, per_chunk = layout.rows(len(buffer))
    a_tensor = OutputTensor(delta.a, delta.a, (rank, cols), (Piece(0, rank, 1, 0, cols),))
    direct = dtype == F32  # the merge rounds to float32: straight into the band
    carve = _Carve(buffer, layout.band_bytes(per_band))
    a_cols, b = carve((rank, width), F64), carve((per_chunk, rank), F64)
    w_rows, merged_rows = carve((per_chunk, width), F64), carve((per_chunk, width), F32)
    work = Work.allocate(per_chunk, width, rank, carve)

    def prepared(c0: int, c1: int) -> Prepared:
        """``A``'s columns ``[c0, c1)`` ready to merge, in the space ``carve`` has left."""
        a = a_cols[:, : c1 - c0]
        fill_rows(a, _columns(a_tensor, c0, c1), 0, params[delta.a], files)
        return prepare(a, delta.scale, _Carve(buffer, carve.used))

    whole = prepared(0, cols) if width == cols else None
    windows = [
        (c0, min(cols, c0 + width), _columns(tensor, c0, min(cols, c0 + width)))
        for c0 in range(0, cols, width)
    ]
    for r0 in range(0, tensor.rows, per_band):
        raw = buffer[: min(per_band, tensor.rows - r0) * row_bytes]
        band = raw.view(dtype).reshape(-1, cols)
        for s0 in range(0, len(band), per_chunk):
            rows = min(per_chunk, len(band) - s0)
            fill_rows(b[:rows], delta.b, r0 + s0, params[delta.b.source], files)
            for c0, c1, columns in windows:
                a = whole or prepared(c0, c1)
                w = w_rows[:rows, : c1 - c0]
                fill_rows(w, columns, r0 + s0, params[tensor.source], files)
                target = band[s0 : s0 + rows, c0:c1]
                merged = target if direct else merged_rows[:rows, : c1 - c0]
                merge_rows(merged, w, b[:rows], a, work)
                if not direct:
                    cast_into(target, merged)
        yield r0 * row_bytes, band, raw
