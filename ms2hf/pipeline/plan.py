"""What a run writes, decided from the source plan alone: every output file and the tensors in
it, each with its recipe (``ms2hf.transforms.pieces``) and output dtype.

Like PyTorch DCP's planners, this is pure metadata: it reads no tensor byte, so ``inspect`` shows
exactly what ``convert`` would write, and the engine (``ms2hf.pipeline.engine``) only executes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from ms2hf.errors import ModelError
from ms2hf.io.config_files import ConfigValue, Given
from ms2hf.io.hf_output import ADAPTER_WEIGHTS
from ms2hf.io.safetensors_writer import TensorEntry
from ms2hf.io.sources.plan import SourcePlan
from ms2hf.pipeline.lora import (
    LoraPlan,
    LoraRequest,
    dropout,
    resolve_alpha,
)
from ms2hf.pipeline.shards import assign_shards
from ms2hf.transforms import lora
from ms2hf.transforms.casts import TARGETS, output_dtype
from ms2hf.transforms.pieces import OutputTensor
from ms2hf.transforms.registry import HfModel, hf_model


@dataclass(frozen=True)
class PlannedTensor:
    tensor: OutputTensor
    dtype: str

    @cached_property
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
    lora: LoraPlan | None = None
    """What is made of the checkpoint's LoRA, when it has one."""

    @property
    def adapter(self) -> bool:
        """A PEFT adapter folder rather than a model folder."""
        return self.lora is not None and self.lora.mode == "adapter"

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


def _planned(
    outputs: Sequence[OutputTensor], source: SourcePlan, dtype: str
) -> list[PlannedTensor]:
    return [PlannedTensor(t, output_dtype(source.params[t.source].dtype, dtype)) for t in outputs]


def plan_files(
    outputs: Sequence[OutputTensor],
    source: SourcePlan,
    dtype: str,
    max_shard_size: int,
    shard_layout: str,
) -> tuple[PlannedFile, ...]:
    """Output dtypes by ``--dtype``, then tensors packed into files."""
    planned = _planned(outputs, source, dtype)
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


def plan_lora(model: HfModel, request: LoraRequest) -> LoraPlan | None:
    """What to make of the checkpoint's LoRA: the mode asked for (merged by default), and alpha
    where the mode needs it (``ms2hf.pipeline.lora``)."""
    weights = model.lora
    if weights is None:
        if request.mode == "adapter":
            raise ModelError(
                "--lora adapter: the checkpoint has no LoRA weights (no <module>.lora_A.weight "
                "parameters), so there is no adapter to write"
            )
        return None
    mode = request.mode or "merged"
    rank_source = f"{weights.modules[0].a} rows"
    try:
        alpha: ConfigValue | None = resolve_alpha(request.given, weights.rank, rank_source)
    except ModelError:
        if mode != "base":
            raise
        alpha = None  # the base model needs no scale: reported when known, never required
    return LoraPlan(
        mode=mode,
        rank=weights.rank,
        modules=len(weights.modules),
        targets=lora.target_modules(model.outputs, weights),
        alpha=alpha,
        dropout=dropout(request.given),
        base_model=request.base_model,
    )


def plan_hf_checkpoint(
    source: SourcePlan,
    given: Given,
    dtype: str,
    max_shard_size: int,
    shard_layout: str = "size",
    routing_scale: str | None = None,
    lora_request: LoraRequest | None = None,
) -> HfPlan:
    """The model, its config and the files a run would write, from shapes alone: on a LoRA
    fine-tune, the merged model, a PEFT adapter or the base model, as ``lora_request`` asks."""
    model, plan, outputs = planned_outputs(source, given, dtype, routing_scale, lora_request)
    if plan is not None and plan.mode == "adapter":
        files = (PlannedFile(ADAPTER_WEIGHTS, tuple(_planned(outputs, source, dtype))),)
        return HfPlan(model, files, plan)
    return HfPlan(model, plan_files(outputs, source, dtype, max_shard_size, shard_layout), plan)


def planned_outputs(
    source: SourcePlan,
    given: Given,
    dtype: str,
    routing_scale: str | None = None,
    lora_request: LoraRequest | None = None,
    config_checks: bool = True,
) -> tuple[HfModel, LoraPlan | None, tuple[OutputTensor, ...]]:
    """The model, what it makes of its LoRA and the tensors a run writes, in the model's order:
    what ``convert`` writes and ``verify --against`` recomputes (without ``config_checks``: it
    writes no config.json)."""
    shapes = {name: p.shape for name, p in source.params.items()}
    model = hf_model(shapes, given, config_dtype(source, dtype), routing_scale, config_checks)
    plan = plan_lora(model, lora_request or LoraRequest())
    return model, plan, lora_outputs(model, plan, shapes)


def lora_outputs(
    model: HfModel, plan: LoraPlan | None, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[OutputTensor, ...]:
    """The tensors a run writes: the model's, merged with its LoRA or a PEFT adapter's, as
    ``plan`` says."""
    if plan is None or model.lora is None or plan.mode == "base":
        return model.outputs
    if plan.mode == "adapter":
        return lora.adapter(model.outputs, model.lora, shapes)
    return lora.merged(model.outputs, model.lora, plan.scale)
