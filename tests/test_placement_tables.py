"""Which rank holds which block, for the layouts no genuine fixture covers (and the worked
examples of docs/layout-math.md): literal tables worked out by hand from the rule, checked
against ms2hf's placement and against the oracle's (tests/oracle/legacy.py).

Reading a table: a layout cuts a tensor into a grid of blocks, dim i into ``ts_i`` parts (the
dev axes its TensorMap entry names) and dim 0 further into ``eff`` optimizer chunks. A block is
named by its grid coordinates, dim 0 counting chunks: ``b_0 = idx_0 * eff + k``. The rule
(docs/layout-math.md, SPEC section 3):

- ``dev`` = dev_matrix (n axes), local rank ``l``, ``c = unravel(l, dev)`` row-major
  (docs/layout-math.md#notation);
- TensorMap axis ``a`` counts from the right: it is ``dev[n-1-a]``, coordinate ``c[n-1-a]``;
  a nested entry ``[a0, a1]`` splits by the product, block index ``c(a0) * dev(a1) + c(a1)``
  (docs/layout-math.md#tensor-map, #nested-entries);
- optimizer sharding is on when step != 0 and size != 0; ``eff = size`` if size > 0 else
  ``N // prod(ts)``; the replica group of ``l`` = the local ranks with ``l``'s coordinates on
  every axis the tensor map uses, ascending; ``pos`` = index of ``l`` in it; ``k = pos % eff``
  (docs/layout-math.md#replica-group, #optimizer-sharding).

Why ``k = pos % eff`` when the shard size is smaller than the group (no genuine fixture shows
it, docs/layout-math.md#notes): MindSpore's ``OperatorInfo::CreateGroupForOptShard`` cuts the
replica group into consecutive all-gather groups of ``size`` ranks (its comment: ``[0, 8, 16,
24] -> [0, 8], [16, 24]``), and ``_load_tensor_by_layout`` gives a rank ``np.split(block,
size)[rank in that group]``, i.e. chunk ``pos % size``. It refuses to shard a parameter whose
group size is not a multiple of ``size`` (and writes no step/size for a group of one rank).

MindSpore Transformers' matrices: ``[dp, cp, tp]`` (cp = 1) for embedding, attention, norms and
dense MLP, so TensorMap axis 0 is tp, 1 is cp, 2 is dp; ``(devices / ep, ep)`` for a MoE layer's
router and experts, axis 0 being ep. ``opt_weight_shard_step`` is ``(g[-1] - g[0]) / (len(g) - 1)``
over the replica group ``g``; only its being non-zero matters here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from ms2hf.io.placement import holders as ms2hf_holders

# ms2hf's placement under test: the one place to re-point when the module moves.
from ms2hf.io.sources.strategy import Layout as Ms2hfLayout
from ms2hf.io.sources.strategy import stored_tensor_map
from tests.oracle import legacy

Table = dict[tuple[int, ...], list[int]]


@dataclass(frozen=True)
class Case:
    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]
    """As the strategy file writes it (Layout form, or one flat entry)."""
    step: int
    size: int
    ndim: int
    table: Table
    """Block -> the local ranks holding it, ascending."""


# fmt: off  (tables laid out by hand, one layout per entry)
CASES = {
    # --- optimizer shard size 2, smaller than the replica group ---------------------------
    # docs/layout-math.md#example-c.
    # DP4 TP1, a column-parallel weight: dev [4,1,1], map [[0],[-1]] -> dim 0 over tp (size 1):
    # ts = (1, 1). Used axis: tp, where every rank has 0, so the group is [0,1,2,3] (step 1);
    # eff = 2, pos = l, k = l % 2: ranks 0,2 hold chunk 0 and ranks 1,3 chunk 1.
    "dp4-tp1-shard2-column": Case(
        (4, 1, 1),
        ((0,), (-1,)),
        1,
        2,
        2,
        {(0, 0): [0, 2], (1, 0): [1, 3]},
    ),
    # DP4 TP1, a norm: map [[-1], []] -> 1-D, unsplit; group [0,1,2,3], k = l % 2 as above.
    "dp4-tp1-shard2-norm": Case(
        (4, 1, 1),
        ((-1,), ()),
        1,
        2,
        1,
        {(0,): [0, 2], (1,): [1, 3]},
    ),
    # DP4 TP2, column: dev [4,1,2], c = (l // 2, 0, l % 2); ts0 = dev[2] = 2, idx0 = l % 2.
    # Group of l: same tp coordinate, even [0,2,4,6] or odd [1,3,5,7] (step 2); pos = l // 2,
    # eff = 2, k = (l // 2) % 2; row block idx0 * 2 + k:
    #   l: 0 1 2 3 4 5 6 7  ->  idx0: 0 1 0 1 0 1 0 1, k: 0 0 1 1 0 0 1 1, block: 0 2 1 3 0 2 1 3
    "dp4-tp2-shard2-column": Case(
        (4, 1, 2),
        ((0,), (-1,)),
        2,
        2,
        2,
        {(0, 0): [0, 4], (1, 0): [2, 6], (2, 0): [1, 5], (3, 0): [3, 7]},
    ),
    # DP4 TP2, row-parallel: map [[-1],[0]], ts = (1, 2), idx1 = l % 2; same groups,
    # k = (l // 2) % 2 on dim 0: block (k, idx1) = l 0:(0,0) 1:(0,1) 2:(1,0) 3:(1,1), then again.
    "dp4-tp2-shard2-row": Case(
        (4, 1, 2),
        ((-1,), (0,)),
        2,
        2,
        2,
        {(0, 0): [0, 4], (0, 1): [1, 5], (1, 0): [2, 6], (1, 1): [3, 7]},
    ),
    # DP4 TP2, a norm: no axis used, so the group is all 8 ranks (step 1), pos = l, k = l % 2.
    "dp4-tp2-shard2-norm": Case(
        (4, 1, 2),
        ((-1,), ()),
        1,
        2,
        1,
        {(0,): [0, 2, 4, 6], (1,): [1, 3, 5, 7]},
    ),
    # MoE router on the EP matrix (2, 4) of 8 devices: map [[-1],[-1]], unsplit; group all 8,
    # k = l % 2.
    "ep4-router-shard2": Case(
        (2, 4),
        ((-1,), (-1,)),
        1,
        2,
        2,
        {(0, 0): [0, 2, 4, 6], (1, 0): [1, 3, 5, 7]},
    ),
    # --- TP4: docs/layout-math.md#example-d ---------------------------------------------------
    # dev [1,1,4], c = (0, 0, l); column: ts0 = 4, idx0 = l.
    "tp4-column": Case(
        (1, 1, 4),
        ((0,), (-1,)),
        0,
        0,
        2,
        {(0, 0): [0], (1, 0): [1], (2, 0): [2], (3, 0): [3]},
    ),
    # Row-parallel: idx1 = l.
    "tp4-row": Case(
        (1, 1, 4),
        ((-1,), (0,)),
        0,
        0,
        2,
        {(0, 0): [0], (0, 1): [1], (0, 2): [2], (0, 3): [3]},
    ),
    # A norm: [[-1], []], unsplit: one block, all four hold it.
    "tp4-norm": Case(
        (1, 1, 4),
        ((-1,), ()),
        0,
        0,
        1,
        {(0,): [0, 1, 2, 3]},
    ),
    # A norm with optimizer sharding -1: group all 4, eff = N // prod(ts) = 4 // 1 = 4, k = l.
    "tp4-norm-shard-all": Case(
        (1, 1, 4),
        ((-1,), ()),
        1,
        -1,
        1,
        {(0,): [0], (1,): [1], (2,): [2], (3,): [3]},
    ),
    # --- DP3, optimizer sharding -1 ---------------------------------------------------------
    # docs/layout-math.md#example-e. DP3 TP1, column: dev [3,1,1]; ts = (1, 1),
    # group [0,1,2], eff = 3 // 1 = 3, k = l.
    "dp3-tp1-shard-all-column": Case(
        (3, 1, 1),
        ((0,), (-1,)),
        1,
        -1,
        2,
        {(0, 0): [0], (1, 0): [1], (2, 0): [2]},
    ),
    # DP3 TP2, column: dev [3,1,2], c = (l // 2, 0, l % 2); ts0 = 2, idx0 = l % 2; group even
    # [0,2,4] or odd [1,3,5] (step 2), eff = 6 // 2 = 3, pos = l // 2, k = pos % 3 = l // 2;
    # row block idx0 * 3 + k:  l: 0 1 2 3 4 5  ->  block: 0 3 1 4 2 5
    "dp3-tp2-shard-all-column": Case(
        (3, 1, 2),
        ((0,), (-1,)),
        2,
        -1,
        2,
        {(0, 0): [0], (1, 0): [2], (2, 0): [4], (3, 0): [1], (4, 0): [3], (5, 0): [5]},
    ),
    # DP3 TP2, row-parallel: ts = (1, 2), idx1 = l % 2, k = l // 2: block (k, idx1).
    "dp3-tp2-shard-all-row": Case(
        (3, 1, 2),
        ((-1,), (0,)),
        2,
        -1,
        2,
        {(0, 0): [0], (0, 1): [1], (1, 0): [2], (1, 1): [3], (2, 0): [4], (2, 1): [5]},
    ),
    # DP3 TP2, a norm: group all 6, eff = 6, k = l.
    "dp3-tp2-shard-all-norm": Case(
        (3, 1, 2),
        ((-1,), ()),
        1,
        -1,
        1,
        {(0,): [0], (1,): [1], (2,): [2], (3,): [3], (4,): [4], (5,): [5]},
    ),
    # --- EP4 experts on the (devices / ep, ep) matrix: docs/layout-math.md#example-f ---------
    # 4 devices: dev (1, 4), c = (0, l); map [[0],[-1]] -> dim 0 over ep = dev[1] = 4, idx0 = l.
    "ep4-of-4-experts": Case(
        (1, 4),
        ((0,), (-1,)),
        0,
        0,
        2,
        {(0, 0): [0], (1, 0): [1], (2, 0): [2], (3, 0): [3]},
    ),
    # 8 devices: dev (2, 4), c = (l // 4, l % 4); idx0 = l % 4, ranks l and l + 4 share it.
    "ep4-of-8-experts": Case(
        (2, 4),
        ((0,), (-1,)),
        0,
        0,
        2,
        {(0, 0): [0, 4], (1, 0): [1, 5], (2, 0): [2, 6], (3, 0): [3, 7]},
    ),
    # The router on the same matrix: [[-1],[-1]], whole on all 8.
    "ep4-of-8-router": Case(
        (2, 4),
        ((-1,), (-1,)),
        0,
        0,
        2,
        {(0, 0): [0, 1, 2, 3, 4, 5, 6, 7]},
    ),
    # ... experts with optimizer sharding -1: group of l = {l % 4, l % 4 + 4} (step 4),
    # eff = 8 // 4 = 2,
    # pos = k = l // 4; row block idx0 * 2 + k:  l: 0 1 2 3 4 5 6 7  ->  0 2 4 6 1 3 5 7
    "ep4-of-8-experts-shard-all": Case(
        (2, 4),
        ((0,), (-1,)),
        4,
        -1,
        2,
        {
            (0, 0): [0],
            (1, 0): [4],
            (2, 0): [1],
            (3, 0): [5],
            (4, 0): [2],
            (5, 0): [6],
            (6, 0): [3],
            (7, 0): [7],
        },
    ),
    # --- the two forms of a tensor map and nested entries -------------------------------------
    # fi_accu's flat form on (devices,): one entry [-1] for its one dim: unsplit, all 8 hold it.
    "flat-1d-replicated": Case(
        (8,),
        ((-1,),),
        0,
        0,
        1,
        {(0,): [0, 1, 2, 3, 4, 5, 6, 7]},
    ),
    # Flat form of a row-parallel weight on [2,1,2]: one entry [-1, 0]: dim 1 over tp,
    # idx1 = c[2] = l % 2.
    "flat-2d-row": Case(
        (2, 1, 2),
        ((-1, 0),),
        0,
        0,
        2,
        {(0, 0): [0, 2], (0, 1): [1, 3]},
    ),
    # docs/layout-math.md#nested-entries: dev [2,2,2], dim-0 entry [2, 0] (dev[0] then dev[2]):
    # ts0 = 4, idx0 = 2 * c0 + c2; c = (l // 4, (l // 2) % 2, l % 2):
    #   l: 0 1 2 3 4 5 6 7  ->  idx0: 0 1 0 1 2 3 2 3
    "nested-docs-example": Case(
        (2, 2, 2),
        ((2, 0), (-1,)),
        0,
        0,
        2,
        {(0, 0): [0, 2], (1, 0): [1, 3], (2, 0): [4, 6], (3, 0): [5, 7]},
    ),
    # Nested entry [0, 2] on [2,1,2] (dim 0 over tp then dp): ts0 = 2 * 2, idx0 = tp * 2 + dp
    # with c = (dp, 0, tp) = (l // 2, 0, l % 2):  l: 0 1 2 3  ->  block: 0 2 1 3
    "nested-tp-dp": Case(
        (2, 1, 2),
        ((0, 2), (-1,)),
        0,
        0,
        2,
        {(0, 0): [0], (1, 0): [2], (2, 0): [1], (3, 0): [3]},
    ),
    # --- the docs' worked examples that a genuine fixture also has -----------------------------
    # docs/layout-math.md#example-a: tiny_fp32_dp2tp2pp2_opt's linear_qkv, dev [2,1,2], column,
    # step 2, size -1: groups {0,2}, {1,3}, eff = 2, k = pos = l // 2; b0 = (l % 2) * 2 + l // 2:
    #   l: 0 1 2 3  ->  b0: 0 2 1 3
    "docs-a-dp2-tp2-shard-all-column": Case(
        (2, 1, 2),
        ((0,), (-1,)),
        2,
        -1,
        2,
        {(0, 0): [0], (1, 0): [2], (2, 0): [1], (3, 0): [3]},
    ),
    # docs/layout-math.md#example-a1: its norms, step 1, size -1: group {0,1,2,3}, eff 4, k = l.
    "docs-a1-dp2-tp2-shard-all-norm": Case(
        (2, 1, 2),
        ((-1,), ()),
        1,
        -1,
        1,
        {(0,): [0], (1,): [1], (2,): [2], (3,): [3]},
    ),
    # docs/layout-math.md#example-b: row-parallel on [2,1,2], no optimizer sharding:
    # idx1 = l % 2, ranks l and l + 2 share a block.
    "docs-b-dp2-tp2-row": Case(
        (2, 1, 2),
        ((-1,), (0,)),
        0,
        0,
        2,
        {(0, 0): [0, 2], (0, 1): [1, 3]},
    ),
}
# fmt: on


def ms2hf_table(case: Case) -> Table:
    layout = Ms2hfLayout(case.dev_matrix, stored_tensor_map(case.tensor_map), case.step, case.size)
    return {tuple(k): sorted(v) for k, v in ms2hf_holders(layout, case.ndim).items()}


def oracle_table(case: Case) -> Table:
    """With a slice of one element per dim, the oracle's offsets are the block coordinates."""
    layout = legacy.Layout(case.dev_matrix, case.tensor_map, case.step, case.size)
    out: Table = {}
    for rank in range(math.prod(case.dev_matrix)):
        _, block = legacy.place(layout, rank, (1,) * case.ndim)
        out.setdefault(block, []).append(rank)
    return out


@pytest.mark.parametrize("name", CASES)
def test_ms2hf_placement_matches_the_table(name: str) -> None:
    assert ms2hf_table(CASES[name]) == CASES[name].table


@pytest.mark.parametrize("name", CASES)
def test_oracle_placement_matches_the_table(name: str) -> None:
    assert oracle_table(CASES[name]) == CASES[name].table
