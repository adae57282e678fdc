"""What the keys of a MindSpore Transformers rank file are: weights, optimizer state or scalars.

Only weights are ever read by a conversion. Optimizer states sit beside them with the same
layout and twice their size; scalars are the training loop's counters.
"""

from __future__ import annotations

from enum import Enum

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "exp_avg.", "exp_avg_sq.", "moments.")

TRAINING_SCALARS = frozenset(
    {
        "global_step",
        "scale_sense",
        "learning_rate",
        "epoch_num",
        "step_num",
        "loss_scale",
        "global_batch_size",
        "current_iterator_step",
        "last_overflow_iterator_step",
    }
)


class KeyKind(Enum):
    PARAMETER = "parameter"
    OPTIMIZER = "optimizer"
    SCALAR = "scalar"


def key_kind(name: str) -> KeyKind:
    if name.startswith(OPTIMIZER_PREFIXES):
        return KeyKind.OPTIMIZER
    if name in TRAINING_SCALARS:
        return KeyKind.SCALAR
    return KeyKind.PARAMETER
