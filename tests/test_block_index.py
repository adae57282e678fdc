"""A parameter's blocks found by bisection (``BlockIndex``) are every block a window of its
matrix meets, as a scan of all blocks finds them; overlapping blocks, which no reader makes,
fall back to the scan."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ms2hf.io.sources.plan import Block, BlockIndex
from tests.conftest import examples


def _grid(rows: list[int], cols: list[int], seed: int) -> tuple[list[Block], tuple[int, int]]:
    """Blocks tiling a matrix cut into the given row and column extents, in a shuffled order."""
    blocks = []
    r0 = 0
    for i, r in enumerate(rows):
        c0 = 0
        for j, c in enumerate(cols):
            blocks.append(Block(Path(f"{i}-{j}"), 0, "w", 0, (r0, c0), (r, c)))
            c0 += c
        r0 += r
    random.Random(seed).shuffle(blocks)
    return blocks, (sum(rows), sum(cols))


def _meets(block: Block, r0: int, r1: int, c0: int, c1: int) -> bool:
    (br, bc), (nr, nc) = block.offsets, block.shape
    return br < r1 and r0 < br + nr and bc < c1 and c0 < bc + nc


@settings(max_examples=examples(200), deadline=None)
@given(
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    cols=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    seed=st.integers(0, 99),
    window=st.tuples(*[st.integers(0, 30)] * 4),
)
def test_the_blocks_found_are_those_a_scan_finds(
    rows: list[int], cols: list[int], seed: int, window: tuple[int, int, int, int]
) -> None:
    blocks, shape = _grid(rows, cols, seed)
    r0, c0 = min(window[0], shape[0] - 1), min(window[2], shape[1] - 1)
    r1, c1 = r0 + 1 + window[1] % shape[0], c0 + 1 + window[3] % shape[1]
    index = BlockIndex(blocks, shape)
    found = [tile[0] for tile in index.covering(r0, r1, c0, c1)]
    assert sorted(found, key=id) == sorted((b for b in blocks if _meets(b, r0, r1, c0, c1)), key=id)
    assert [t[0] for t in index.covering(0, shape[0], 0, shape[1])] == blocks  # plan order


def test_overlapping_blocks_are_all_returned() -> None:
    a = Block(Path("a"), 0, "w", 0, (0, 0), (4, 4))
    b = Block(Path("b"), 0, "w", 0, (2, 2), (4, 4))
    index = BlockIndex([a, b], (6, 6))
    assert [t[0] for t in index.covering(0, 1, 0, 1)] == [a, b]
