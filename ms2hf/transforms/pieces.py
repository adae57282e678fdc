"""The shape of a transform: each output tensor is a stack of pieces cut from one source tensor.

A piece is a strided run of source rows and a range of columns, optionally transposed. That is
enough for every Qwen3 rule (a rename is one whole piece; the QKV split is one piece per query
group; the interleaved gate/up split is a stride-2 piece; an MoE expert is a transposed window)
and, because a piece is pure metadata, the executor can produce any band of output rows straight
from the source blocks that hold them, without assembling the source tensor first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Source rows ``row_start + row_step * i`` for ``i < row_count``, columns
    ``[col_start, col_stop)``; transposed, they give ``col_stop - col_start`` output rows."""

    row_start: int
    row_count: int
    row_step: int = 1
    col_start: int = 0
    col_stop: int = 1
    transpose: bool = False

    @property
    def out_rows(self) -> int:
        return self.col_stop - self.col_start if self.transpose else self.row_count

    @property
    def out_cols(self) -> int:
        return self.row_count if self.transpose else self.col_stop - self.col_start


@dataclass(frozen=True)
class LoraDelta:
    """``scale * (B @ A)``, added to an output tensor in float64 before it is rounded
    (``docs/lora.md#3-the-merged-model``): ``b`` is the tensor's own rows of a ``lora_B``
    parameter (``[rows, r]``), ``a`` the whole ``lora_A`` parameter (``[r, columns]``)."""

    b: OutputTensor
    a: str
    scale: float


@dataclass(frozen=True)
class OutputTensor:
    """One Hugging Face tensor: its name, shape, and where its rows come from; with ``delta``,
    a fine-tuned weight: those rows plus a LoRA change."""

    name: str
    source: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    scale: float = 1.0
    """Every element multiplied by this, in fp32 before the output cast (a routing scale
    folded into an expert's ``down_proj``: ``docs/qwen3-moe.md#routing``)."""
    delta: LoraDelta | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        """Every parameter its bytes are made of."""
        if self.delta is None:
            return (self.source,)
        return (self.source, self.delta.b.source, self.delta.a)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elements(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


def _cols(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def copy(name: str, source: str, shape: tuple[int, ...]) -> OutputTensor:
    """The whole source tensor under a new name."""
    rows = shape[0] if shape else 1
    return OutputTensor(name, source, shape, (Piece(0, rows, 1, 0, _cols(shape)),))


def row_runs(
    name: str,
    source: str,
    source_shape: tuple[int, ...],
    runs: list[tuple[int, int]],
    step: int = 1,
) -> OutputTensor:
    """Stacked runs of source rows, each ``(first row, count)``, all columns kept."""
    cols = _cols(source_shape)
    pieces = tuple(Piece(start, count, step, 0, cols) for start, count in runs)
    rows = sum(count for _, count in runs)
    return OutputTensor(name, source, (rows, *source_shape[1:]), pieces)


def transposed_window(
    name: str, source: str, rows: tuple[int, int], cols: tuple[int, int]
) -> OutputTensor:
    """``source[rows[0]:rows[1], cols[0]:cols[1]].T``: how MoE experts are stored."""
    piece = Piece(rows[0], rows[1] - rows[0], 1, cols[0], cols[1], transpose=True)
    return OutputTensor(name, source, (piece.out_rows, piece.out_cols), (piece,))
