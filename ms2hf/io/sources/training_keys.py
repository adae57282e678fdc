"""What the keys of a MindSpore Transformers rank file are: weights, optimizer state or scalars.

Only weights are ever read by a conversion. Optimizer states sit beside them with the same
layout and twice their size; scalars are the training loop's counters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from ms2hf.io.safetensors_reader import TensorInfo

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


@dataclass(frozen=True)
class SortedKeys:
    """A header's keys sorted out: parameters and scalars in header order, optimizer bytes."""

    params: tuple[TensorInfo, ...]
    scalars: tuple[TensorInfo, ...]
    optimizer_bytes: int
    scalar_bytes: int


def sort_keys(tensors: Mapping[str, TensorInfo]) -> SortedKeys:
    """Every source format's first step with a header: what it holds of each kind."""
    params: list[TensorInfo] = []
    scalars: list[TensorInfo] = []
    optimizer_bytes = scalar_bytes = 0
    for key, info in tensors.items():
        kind = key_kind(key)
        if kind is KeyKind.OPTIMIZER:
            optimizer_bytes += info.nbytes
        elif kind is KeyKind.SCALAR:
            scalar_bytes += info.nbytes
            scalars.append(info)
        else:
            params.append(info)
    return SortedKeys(tuple(params), tuple(scalars), optimizer_bytes, scalar_bytes)
