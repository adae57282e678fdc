"""A model family, as the generator sees it: its parameters in MindSpore names, each with the
layout MindSpore writes for it, plus what to say about the model in config files.

A family lists its parameters; everything else (optimizer sharding, which rank saves what,
strategy and rank files, the expected Hugging Face tensors through ``ms2hf.transforms``) follows
generically. Each family is one ``model_spec`` function (``qwen3``, ``qwen3_moe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the training network."""

    name: str
    shape: tuple[int, ...]
    stage: int
    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]
    """TensorMap entries exactly as MindSpore writes them: in the Layout form one per tensor dim
    (axes counted from the right, -1 for none) and an extra empty one for a 1-D tensor."""
    node: str
    """The op owning the parameter, as strategy files name it after the network prefix."""
    training_only: bool = False
    """A statistic of training, not a weight (``mlp.router.fi_accu``): the optimizer never sees
    it (no Adam states, no gradient accumulator, never optimizer-sharded) and no Hugging Face
    tensor is made of it, so the generator fills it with random values."""
    dtype: str | None = None
    """Its own safetensors dtype when the network fixes one; None: the run's ``params_dtype``."""


@dataclass(frozen=True)
class ModelSpec:
    network: str
    """The prefix of every op's node name: the training cell chain of MindSpore Transformers."""
    params: tuple[ParamSpec, ...]
    """In network order, which is the order of the strategy files."""
    hf_config: dict[str, Any]
    """The model's Hugging Face configuration, as the fixtures' ``config.json`` gives it."""
    model_config: dict[str, Any]
    """The training yaml's ``model.model_config``: sizes and the weight layout flags."""
