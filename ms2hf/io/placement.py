"""Which block of a parameter a rank holds (``docs/layout-math.md``), from its layout alone.

A layout cuts every tensor dim into equal parts: dim i into ``ts_i`` by the dev axes its
TensorMap names, and dim 0 further into ``eff`` optimizer chunks when optimizer sharding is on.
A rank's slice is then the block at grid coordinates ``b``, and it sits at ``b_i * slice_i``.
Thinking in grid coordinates, not byte offsets, makes the coverage check a set comparison and
keeps the optimizer-shard case from being a special path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ms2hf.errors import LayoutError
from ms2hf.io.sources.strategy import Layout


@dataclass(frozen=True)
class Grid:
    """How a layout cuts a tensor of a given rank."""

    parts: tuple[int, ...]
    """Blocks along each dim (dim 0 includes the optimizer chunks)."""
    dim_axes: tuple[tuple[int, ...], ...]
    opt_chunks: int

    def full_shape(self, slice_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(d * p for d, p in zip(slice_shape, self.parts))

    def offsets(self, coords: tuple[int, ...], slice_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(b * d for b, d in zip(coords, slice_shape))

    @property
    def model_parts(self) -> tuple[int, ...]:
        """Parts per dim from model parallelism alone (``parts`` without optimizer chunks)."""
        if not self.parts:
            return ()
        return (self.parts[0] // self.opt_chunks, *self.parts[1:])


def unravel(index: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major coordinates of ``index`` in a grid of ``dims`` (the last dim fastest)."""
    coords = []
    for d in reversed(dims):
        index, c = divmod(index, d)
        coords.append(c)
    return tuple(reversed(coords))


@lru_cache(maxsize=4096)
def grid(layout: Layout, ndim: int) -> Grid:
    dim_axes = layout.dim_axes(ndim)
    if dim_axes is None:
        raise LayoutError(
            f"tensor_map {[list(e) for e in layout.tensor_map]} does not describe a "
            f"{ndim}-dimensional tensor"
        )
    n = len(layout.dev_matrix)
    splits = [math.prod(layout.dev_matrix[n - 1 - a] for a in axes) for axes in dim_axes]
    used = {a for axes in dim_axes for a in axes}
    if len(used) != sum(len(axes) for axes in dim_axes):
        raise LayoutError(
            f"tensor_map {[list(e) for e in layout.tensor_map]} uses a dev axis twice"
        )
    chunks = 1
    if layout.optimizer_sharded and ndim > 0:
        if layout.opt_shard_size > 0:
            chunks = layout.opt_shard_size
        else:
            chunks = layout.devices // math.prod(splits)
        splits[0] *= chunks
    if math.prod(splits) > layout.devices:
        raise LayoutError(
            f"the layout cuts the tensor into {math.prod(splits)} blocks "
            f"(optimizer shard size {layout.opt_shard_size}), more than its "
            f"{layout.devices} devices can hold"
        )
    return Grid(tuple(splits), dim_axes, chunks)


@lru_cache(maxsize=65536)
def block_coords(layout: Layout, ndim: int, local_rank: int) -> tuple[int, ...]:
    """The grid coordinates of the block that ``local_rank`` holds."""
    g = grid(layout, ndim)
    dev = layout.dev_matrix
    n = len(dev)
    if not 0 <= local_rank < layout.devices:
        raise LayoutError(
            f"local rank {local_rank} is outside the device matrix {list(dev)} "
            f"({layout.devices} devices per stage)"
        )
    c = unravel(local_rank, dev)
    coords = []
    for axes in g.dim_axes:
        idx = 0
        for a in axes:  # mixed radix, first axis most significant
            idx = idx * dev[n - 1 - a] + c[n - 1 - a]
        coords.append(idx)
    if g.opt_chunks > 1:
        # Position in the replica group (ranks equal on every used axis, ascending) is the
        # row-major index of this rank's coordinates on the unused axes.
        used = {n - 1 - a for axes in g.dim_axes for a in axes}
        pos = 0
        for i in range(n):
            if i not in used:
                pos = pos * dev[i] + c[i]
        coords[0] = coords[0] * g.opt_chunks + pos % g.opt_chunks
    return tuple(coords)


@lru_cache(maxsize=1024)
def coords_table(layout: Layout, ndim: int) -> tuple[tuple[int, ...], ...]:
    """``block_coords`` of every local rank, at once: planning a save of thousands of ranks
    looks a layout up once per parameter, not once per rank and parameter."""
    return tuple(block_coords(layout, ndim, r) for r in range(layout.devices))


@lru_cache(maxsize=1024)
def offsets_table(
    layout: Layout, ndim: int, slice_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], ...]:
    """Where every local rank's block (of ``slice_shape``) starts in the full tensor."""
    g = grid(layout, ndim)
    return tuple(g.offsets(c, slice_shape) for c in coords_table(layout, ndim))


def holders(layout: Layout, ndim: int) -> dict[tuple[int, ...], list[int]]:
    """For every block, the local ranks whose slice it is: who should have saved it."""
    out: dict[tuple[int, ...], list[int]] = {}
    for rank, coords in enumerate(coords_table(layout, ndim)):
        out.setdefault(coords, []).append(rank)
    return out
