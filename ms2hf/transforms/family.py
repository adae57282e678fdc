"""What a model family is: everything ms2hf needs to know about one kind of model.

A family is recognised from its parameters' names, never from flags. It brings: its Hugging Face
class and ``model_type``, how to read its sizes off the tensors and check given values against
them, its config.json defaults, its rename table (``ms2hf.transforms.mappings``), and its training
network (every MindSpore parameter with its shape and parallel role), from which the generator
writes test checkpoints and ``verify`` derives the tensors a config.json implies. Each family is
one module (``qwen3``, ``qwen3_moe``) defining a ``FAMILY``; ``ms2hf.transforms.registry`` lists
them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ms2hf.io.config_files import Given
from ms2hf.transforms.mappings import Table

Shapes = Mapping[str, tuple[int, ...]]


class Role(Enum):
    """How MindSpore Transformers lays a parameter out over a stage's devices; the generator
    turns each into the device matrix and tensor map a real run writes (``docs/layout-math.md``)."""

    EMBEDDING = "vocab-parallel embedding: dim 0 over tp"
    COLUMN = "column-parallel linear: dim 0 over tp"
    ROW = "row-parallel linear: dim 1 over tp"
    NORM = "replicated norm"
    ROUTER = "replicated MoE router"
    ROUTER_STATISTIC = "MoE router statistic: replicated, flat form, never trained"
    EXPERTS_IN = "grouped experts, first operand: dim 0 over ep"
    EXPERTS_OUT = "grouped experts, second operand: dim 0 over ep"
    REPLICATED_LINEAR = "linear replicated over tp (a LoRA half beside a split weight)"


@dataclass(frozen=True)
class NetworkParam:
    """One parameter of the training network, as a run of this family creates it."""

    name: str
    shape: tuple[int, ...]
    role: Role
    dtype: str | None = None
    """A dtype the network fixes whatever ``params_dtype`` says (MoE ``fi_accu`` is F32)."""


@dataclass(frozen=True)
class ModelFamily:
    name: str
    """The name users type (``--model``, ``demo --model``)."""
    model_type: str
    """Hugging Face's ``model_type``."""
    architecture: str
    matches: Callable[[Shapes], bool]
    """Whether a checkpoint's parameters are this family's (families are tried in order)."""
    dims_type: type
    """The model's sizes: a frozen dataclass whose fields are config.json names."""
    infer_dims: Callable[[Shapes], Any]
    """The sizes read off the tensors (a ``dims_type``)."""
    check_given: Callable[[Any, Given], list[str]]
    """Every given value (flag, yaml, reference config) the sizes contradict, as messages."""
    defaults: Mapping[str, Any]
    """config.json entries the weights cannot tell, as the published models set them."""
    table: Table
    network: Callable[[Any], list[NetworkParam]]
    """The training network's parameters for given sizes, in the network's own order (the
    order of its strategy files)."""
    dims_from_config: Callable[[Mapping[str, Any]], Any]
    """The sizes a Hugging Face config.json states, for ``verify``."""
    example: Any
    """A small model of this family (a ``dims_type``): what ``ms2hf demo --model`` trains."""
    aliases: tuple[str, ...] = field(default=())
    """Other spellings users type for it (the old tools' ``--model`` values)."""
    evidence: str = ""
    """What in the parameters shows a checkpoint is this family, for messages."""
    settings: frozenset[str] = frozenset()
    """Settings of the training run it reads from the yaml (or a flag) besides its config.json
    entries and sizes: each either reaches the output or stops the run (``routing``)."""
    routing: Callable[[Any, Given, str | None], Routing] | None = None
    """The routing settings given, under a policy for a routing scale Hugging Face cannot state
    (``fold``, ``ignore`` or None): what to do with them, or the problems they raise."""

    @property
    def keys(self) -> frozenset[str]:
        """Every name a given value of this family may have: sizes, config.json entries the
        weights cannot tell, and its other settings."""
        sizes = {f.name for f in dataclasses.fields(self.dims_type)}
        return frozenset({*sizes, *self.defaults, *self.settings})


@dataclass(frozen=True)
class Routing:
    """What a family makes of the routing settings a training run used."""

    problems: tuple[str, ...] = ()
    expert_scale: float = 1.0
    """Multiplies every routed expert's output projection (a routing scale folded in)."""
    notes: tuple[str, ...] = ()
