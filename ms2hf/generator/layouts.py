"""How a generated parameter is laid out over a stage's devices, and which ranks save it.

The slice math is ``ms2hf.io.placement``'s (one source of truth for converter and
generator); this module only decides what a training run decides: whether the optimizer shards a
parameter, and, when redundancy is removed, which rank of each replica group saves each key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ms2hf.errors import Ms2hfError
from ms2hf.generator.network import ParamSpec
from ms2hf.io.placement import block_coords, grid, holders
from ms2hf.io.sources.strategy import Layout, stored_tensor_map

SAVED_STATES = ("adam_m.", "adam_v.")
"""A trained weight's optimizer states, saved beside it in every rank file that saves it."""
ACCUMULATORS = "accu_grads."
"""Gradient accumulators: in the strategy files only, never saved."""


@dataclass(frozen=True)
class PlacedParam:
    spec: ParamSpec
    layout: Layout
    """As the strategy file states it, optimizer sharding included."""
    slice_shape: tuple[int, ...]

    @property
    def saved_prefixes(self) -> tuple[str, ...]:
        """Its keys in a rank file, as prefixes of its name: itself, then any Adam states."""
        return ("", *SAVED_STATES) if self.spec.trainable else ("",)

    @property
    def splits(self) -> tuple[int, ...]:
        """Model-parallel parts per dim: the weight's entry in ``parallel_strategy_item``."""
        return grid(self.layout, len(self.spec.shape)).model_parts

    def region(self, local_rank: int) -> tuple[slice, ...]:
        """The part of the full tensor that ``local_rank`` holds."""
        coords = block_coords(self.layout, len(self.spec.shape), local_rank)
        return tuple(slice(c * d, (c + 1) * d) for c, d in zip(coords, self.slice_shape))


def _replica_group(layout: Layout, ndim: int) -> tuple[int, ...]:
    """The local ranks holding local rank 0's model-parallel block (every group looks alike)."""
    return tuple(holders(layout, ndim)[block_coords(layout, ndim, 0)])


def place(spec: ParamSpec, opt_shard: int) -> PlacedParam:
    """Fix a parameter's layout. The optimizer shards a trained parameter over its replica group
    when the group divides into ``opt_shard``-sized parts and dim 0 of its slice into as many
    chunks; otherwise the parameter stays unsharded (step and size 0). The fixtures do not show
    what MindSpore writes for such a parameter; any reader takes 0 as unsharded."""
    ndim = len(spec.shape)
    base = Layout(spec.dev_matrix, stored_tensor_map(spec.tensor_map))
    parts = grid(base, ndim).parts
    if any(d % p for d, p in zip(spec.shape, parts)):
        raise Ms2hfError(
            f"parameter {spec.name!r} of shape {list(spec.shape)} cannot be split into "
            f"{list(parts)} equal parts by its layout {list(spec.dev_matrix)} / "
            f"{[list(e) for e in spec.tensor_map]}; choose sizes divisible by the parallel degrees"
        )
    layout = base
    group = _replica_group(base, ndim)
    chunks = opt_shard if opt_shard > 0 else len(group)
    even = chunks > 1 and len(group) % chunks == 0 and (spec.shape[0] // parts[0]) % chunks == 0
    if opt_shard and even and not spec.training_only:
        step = (group[-1] - group[0]) // (len(group) - 1)
        layout = replace(base, opt_shard_step=step, opt_shard_size=opt_shard)
    slice_shape = tuple(d // p for d, p in zip(spec.shape, grid(layout, ndim).parts))
    return PlacedParam(spec, layout, slice_shape)


def strategy_keys(params: Sequence[PlacedParam]) -> list[tuple[str, PlacedParam]]:
    """Every layout entry of a stage's strategy file, in MindSpore's order (the genuine
    fixtures'): the trained weights in network order, their gradient accumulators, the other
    parameters (training statistics; a LoRA run's frozen weights) in network order, then the
    trained weights' Adam states."""
    trained = [p for p in params if p.spec.trainable]
    others = [p for p in params if not p.spec.trainable]
    groups = [("", trained), (ACCUMULATORS, trained), ("", others)]
    groups += [(state, trained) for state in SAVED_STATES]
    return [(prefix + p.spec.name, p) for prefix, group in groups for p in group]


def savers(params: Sequence[PlacedParam], remove_redundancy: bool) -> dict[str, frozenset[int]]:
    """The local ranks that save each key (parameters and Adam states) of one stage.

    With redundancy removed MindSpore gives each replica group's keys to its members in turn:
    the i-th key of a group, in name order over every strategy entry (``accu_grads.*`` included,
    though never saved), goes to member ``i % len(group)``. That order is what reproduces the
    genuine ``tiny_bf16_dedup`` fixture, in which a norm and its Adam states may land on
    different ranks. A group here is the set of ranks physically holding one block.
    """
    by_key = dict(strategy_keys(params))
    turns: Counter[tuple[int, ...]] = Counter()
    out: dict[str, frozenset[int]] = {}
    for key in sorted(by_key):
        p = by_key[key]
        groups = [tuple(g) for g in holders(p.layout, len(p.spec.shape)).values()]
        if remove_redundancy:
            chosen = set()
            for g in groups:
                chosen.add(g[turns[g] % len(g)])
                turns[g] += 1
            out[key] = frozenset(chosen)
        else:
            out[key] = frozenset(r for g in groups for r in g)
    return {k: v for k, v in out.items() if not k.startswith(ACCUMULATORS)}
