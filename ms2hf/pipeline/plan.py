"""What a run writes, decided from the source plan alone: every output file and the tensors in
it, each with its recipe (``ms2hf.transforms.pieces``) and output dtype.

Like PyTorch DCP's planners, this is pure metadata: it reads no tensor byte, so ``inspect`` shows
exactly what ``convert`` would write, and the engine (``ms2hf.pipeline.engine``) only executes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ms2hf.io.config_files import Given
from ms2hf.io.safetensors_writer import TensorEntry
from ms2hf.io.sources.plan import SourcePlan
from ms2hf.pipeline.shards import assign_shards
from ms2hf.transforms.casts import TARGETS, output_dtype
from ms2hf.transforms.pieces import OutputTensor
from ms2hf.transforms.registry import HfModel, hf_model


@dataclass(frozen=True)
class PlannedTensor:
    tensor: OutputTensor
    dtype: str

    @property
    def entry(self) -> TensorEntry:
        return TensorEntry(self.tensor.name, self.dtype, self.tensor.shape)


@dataclass(frozen=True)
class PlannedFile:
    name: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


@dataclass(frozen=True)
class HfPlan:
    """A Hugging Face checkpoint to write: the model (tensors, config) and its files."""

    model: HfModel
    files: tuple[PlannedFile, ...]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def parameters(self) -> int:
        """Elements of every tensor: the index's ``total_parameters``."""
        return sum(math.prod(t.tensor.shape) for f in self.files for t in f.tensors)

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.tensor.name: f.name for f in self.files for t in f.tensors}


def plan_files(
    outputs: Sequence[OutputTensor],
    source: SourcePlan,
    dtype: str,
    max_shard_size: int,
    shard_layout: str,
) -> tuple[PlannedFile, ...]:
    """Output dtypes by ``--dtype``, then tensors packed into files."""
    planned = [
        PlannedTensor(t, output_dtype(source.params[t.source].dtype, dtype)) for t in outputs
    ]
    names = [p.tensor.name for p in planned]
    sizes = [p.entry.nbytes for p in planned]
    shards = assign_shards(planned, names, sizes, max_shard_size, shard_layout)
    return tuple(PlannedFile(name, tuple(group)) for name, group in shards)


def config_dtype(source: SourcePlan, dtype: str) -> str:
    """The dtype config.json names: ``--dtype``'s, or with ``source`` the weights' own (float32
    when they mix dtypes)."""
    tag = TARGETS.get(dtype)
    if tag is None:
        dtypes = {p.dtype for p in source.params.values()}
        tag = dtypes.pop() if len(dtypes) == 1 else "F32"
    return tag


def plan_hf_checkpoint(
    source: SourcePlan,
    given: Given,
    dtype: str,
    max_shard_size: int,
    shard_layout: str = "size",
    routing_scale: str | None = None,
) -> HfPlan:
    """The model, its config and the files a run would write, from shapes alone."""
    shapes = {name: p.shape for name, p in source.params.items()}
    model = hf_model(shapes, given, config_dtype(source, dtype), routing_scale)
    return HfPlan(model, plan_files(model.outputs, source, dtype, max_shard_size, shard_layout))
