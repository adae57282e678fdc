"""A stage's strategy file, encoded as MindSpore writes it (Layout form).

Every rank of a stage writes the same bytes: one ``parallel_strategy_item`` per weight-owning op
(input strategy ``[1, 1]``, then the weight's parts per dim), then one ``parallel_layout_item``
per parameter and per gradient accumulator and Adam state of a trained one, in
``strategy_keys`` order, with every scalar field set explicitly. ``current_stage`` is a save
counter, 1 after the first save, not the stage.
"""

from __future__ import annotations

from collections.abc import Sequence

from ms2hf.generator.layouts import PlacedParam, strategy_keys
from ms2hf.io.sources.strategy_proto import ParallelStrategyMap

SAVE_COUNT = 1
INPUT_STRATEGY = (1, 1)


def encode_stage(network: str, stage: int, params: Sequence[PlacedParam]) -> bytes:
    msg = ParallelStrategyMap(current_stage=SAVE_COUNT)
    for p in params:
        item = msg.parallel_strategy_item.add(node_name=f"{network}/{p.spec.node}")
        item.parallel_strategys.stage = stage
        item.parallel_strategys.parallel_strategy.add(dim=INPUT_STRATEGY)
        item.parallel_strategys.parallel_strategy.add(dim=p.splits)
    for key, p in strategy_keys(params):
        layouts = msg.parallel_layout_item.add(param_name=key).parallel_layouts
        layouts.dev_matrix.add(dim=p.spec.dev_matrix)
        for entry in p.spec.tensor_map:
            layouts.tensor_map.add(dim=entry)
        layouts.param_split_shape.add()
        layouts.indices_offset.add()
        layouts.field = 0
        layouts.opt_weight_shard_step = p.layout.opt_shard_step
        layouts.opt_weight_shard_size = p.layout.opt_shard_size
    encoded: bytes = msg.SerializeToString()
    return encoded
