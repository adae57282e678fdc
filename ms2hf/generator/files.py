"""The files a generated save writes, as data: what each file holds, and where each piece of a
parameter goes.

Both save formats reduce to this: the legacy layout (a file per rank) and Checkpoint 2.0 (files
numbered by a save plan) differ only in which files exist and which slices each holds. Given
that, one writer (``ms2hf.generator.checkpoint``) builds every parameter once and copies its
pieces into their files, whatever the format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ms2hf.io.dtypes import to_numpy
from ms2hf.io.safetensors_writer import TensorEntry

ADAM_STATE = "F32"
"""Adam moments are fp32 whatever the weights' dtype."""


@dataclass(frozen=True)
class FileSpec:
    """One file of the save: its tensors (which fix its header) and the constants it holds."""

    path: Path
    entries: tuple[TensorEntry, ...]
    metadata: Mapping[str, str]
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    """Tensors known before any parameter is built (training scalars), by name."""


@dataclass(frozen=True)
class Slot:
    """A piece of a parameter in a file: its region of the full parameter, under ``state`` +
    the parameter's name (``""`` the weight itself, ``adam_m.``/``adam_v.`` its moments)."""

    file: int
    """Index into the save's ``FileSpec``s."""
    state: str
    region: tuple[slice, ...]


def training_scalars(step: int) -> dict[str, tuple[str, np.ndarray]]:
    """The training loop's counters as MindSpore Transformers saves them in tensors."""
    table = {
        "epoch_num": ("I64", (), step),
        "loss_scale": ("I64", (), 1),
        "step_num": ("I64", (), step),
        "learning_rate": ("F32", (), 1e-6),
        "scale_sense": ("F32", (), 1.0),
        "global_step": ("I32", (1,), step),
    }
    return {
        name: (tag, np.full(shape, value, to_numpy(tag)))
        for name, (tag, shape, value) in table.items()
    }
