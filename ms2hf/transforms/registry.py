"""The registry of model families, and what is decided from it: which family a checkpoint is,
its Hugging Face tensors and config, and what tensors a config.json implies.

The command line, ``inspect``, ``reverse`` and the demo read ``FAMILIES``; adding a model is one
new module defining a ``ModelFamily`` and one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ms2hf.errors import ModelError
from ms2hf.io.config_files import ConfigValue, Given
from ms2hf.transforms import qwen3, qwen3_moe
from ms2hf.transforms.family import ModelFamily, Routing
from ms2hf.transforms.hf_config import GIVEN_ONLY, build_config, value_problems
from ms2hf.transforms.lora import LoraWeights, split_lora
from ms2hf.transforms.mappings import Context, Planned, TiedHead, WeightLayout, layer_keys
from ms2hf.transforms.pieces import OutputTensor

Shapes = Mapping[str, tuple[int, ...]]

FAMILIES: tuple[ModelFamily, ...] = (qwen3_moe.FAMILY, qwen3.FAMILY)
"""In detection order: the most specific first."""


def by_name(name: str) -> ModelFamily:
    """The family a user named (its name, ``model_type`` or an alias, any case)."""
    wanted = name.lower()
    for family in FAMILIES:
        if wanted in (family.name, family.model_type, *family.aliases):
            return family
    raise ModelError(
        f"{name!r} is not supported; ms2hf converts {', '.join(f.name for f in FAMILIES)}"
    )


def by_model_type(model_type: str) -> ModelFamily:
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    raise ModelError(
        f"config.json: model_type {model_type!r} has no shape rules (known: "
        f"{', '.join(f.model_type for f in FAMILIES)})"
    )


def detect(shapes: Shapes) -> ModelFamily:
    """The family whose parameters these are."""
    for family in FAMILIES:
        if family.matches(shapes):
            return family
    raise ModelError(
        "the parameters are no model ms2hf knows (no 'embedding.word_embeddings.weight'); "
        "is this a Qwen3 training checkpoint?"
    )


def weight_layout(given: Mapping[str, ConfigValue]) -> WeightLayout:
    """The fused-weight layout flags of the training yaml, defaults where absent."""
    defaults = WeightLayout()
    contiguous = given.get("use_contiguous_weight_layout_attention")
    interleaved = given.get("use_interleaved_weight_layout_mlp")
    return WeightLayout(
        contiguous_qkv=bool(contiguous.value) if contiguous else defaults.contiguous_qkv,
        interleaved_fc1=bool(interleaved.value) if interleaved else defaults.interleaved_fc1,
    )


@dataclass(frozen=True)
class HfModel:
    """A checkpoint's Hugging Face form: its family, sizes, tensors and config.json."""

    family: ModelFamily
    dims: Any
    outputs: tuple[OutputTensor, ...]
    """The base model's tensors (a LoRA is applied to them by ``ms2hf.transforms.lora``)."""
    skipped: frozenset[str]
    """Parameters deliberately left out: statistics of training, not weights."""
    config: dict[str, ConfigValue]
    notes: tuple[str, ...] = ()
    """What the run should say about how the given settings were applied (a folded scale)."""
    lora: LoraWeights | None = None
    """The checkpoint's LoRA weights, checked; None for a checkpoint without LoRA."""

    @property
    def model_type(self) -> str:
        return self.family.model_type


def plan_outputs(
    family: ModelFamily, shapes: Shapes, dims: Any, layout: WeightLayout, expert_scale: float = 1.0
) -> Planned:
    return family.table.apply(Context(shapes, dims, layout, expert_scale), layer_keys(shapes))


ROUTING_POLICIES = ("fold", "ignore")
"""What to do with a routing scale Hugging Face's model cannot state: fold it into the experts'
weights, or drop it knowingly. Without one, a scale other than 1 stops the run."""


def settable_keys() -> frozenset[str]:
    """Every setting a flag may give: any family's sizes, config.json entries and settings."""
    return frozenset({*GIVEN_ONLY, *(key for f in FAMILIES for key in f.keys)})


def _source(value: ConfigValue) -> str:
    """The file or flag a value came from, without the key."""
    return value.origin.partition(": ")[0]


def family_problems(family: ModelFamily, given: Given) -> list[str]:
    """Given values that describe another model family: a ``model_type`` or ``architectures``
    that is not this one, or settings only another family has (experts on a dense model), one
    message per file or flag that gave them."""
    foreign = {key for f in FAMILIES if f is not family for key in f.keys} - family.keys
    claims: dict[str, list[str]] = {}
    for name, value in given.items():
        stated = value.value
        if name == "model_type":
            wrong = stated != family.model_type
        elif name == "architectures":
            names = [stated] if isinstance(stated, str) else stated
            wrong = not isinstance(names, list) or family.architecture not in names
        else:
            wrong = name in foreign and stated is not None
        if wrong:
            item = f"{name} = {stated!r}" if ": " in value.origin else f"= {stated!r}"
            claims.setdefault(_source(value), []).append(item)
    return [
        f"{source} describes another model ({', '.join(items)}), but the checkpoint is "
        f"{family.name} ({family.evidence}): the file of another run?"
        if not items[0].startswith("=")
        else f"{source} {items[0]} is a setting of another model, but the checkpoint is "
        f"{family.name} ({family.evidence})"
        for source, items in claims.items()
    ]


def disagreement_problems(given: Given, dims: Any) -> list[str]:
    """Settings two files state differently, each with the weights' value when they tell it."""
    problems = []
    for name, value in given.items():
        if not value.disagrees:
            continue
        stated = " and ".join(f"{v.origin} = {v.value!r}" for v in (value, *value.disagrees))
        actual = getattr(dims, name, None)
        weights = f"; the weights give {name} = {actual!r}" if actual is not None else ""
        problems.append(
            f"{stated} disagree{weights}; settle it with --set {name}=VALUE, or give only one "
            "of the files"
        )
    return problems


def hf_model(
    shapes: Shapes,
    given: Given,
    out_dtype: str,
    routing_scale: str | None = None,
    config_checks: bool = True,
) -> HfModel:
    """Plan the Hugging Face tensors and config of a checkpoint, checking ``given`` values
    (flags, yaml and reference config entries) against the shapes and the family; every problem
    (another family's file, files that disagree, sizes the weights contradict, routing Hugging
    Face cannot state, values no loader accepts) is reported at once. Without
    ``config_checks`` only what shapes the tensors is checked (``verify`` recomputing bytes from
    a yaml whose config.json values it does not write). LoRA weights are split off and checked
    (``ms2hf.transforms.lora``)."""
    family = detect(shapes)
    shapes, lora = split_lora(shapes, family.table)
    dims = family.infer_dims(shapes)
    problems = family_problems(family, given)
    if config_checks:
        problems += disagreement_problems(given, dims)
    settled = {name: value for name, value in given.items() if not value.disagrees}
    problems += family.check_given(dims, settled)
    routing = family.routing(dims, settled, routing_scale) if family.routing else Routing()
    problems += routing.problems
    config = build_config(family, dims, out_dtype, settled)
    if config_checks:
        problems += value_problems(family, config, settled)
    if problems:
        raise ModelError("; ".join(problems))
    planned = plan_outputs(family, shapes, dims, weight_layout(given), routing.expert_scale)
    return HfModel(family, dims, planned.outputs, planned.skipped, config, routing.notes, lora)


@dataclass(frozen=True)
class ExpectedTensors:
    """The tensors a Hugging Face checkpoint of a config must hold."""

    required: dict[str, tuple[int, ...]]
    optional: dict[str, tuple[int, ...]]
    """Tensors a checkpoint may omit (``lm_head.weight`` when the embeddings are tied)."""


def expected_tensors(config: Mapping[str, Any]) -> ExpectedTensors:
    """What a config.json implies: the family's network for the stated sizes, through its table.
    The same rows that write a checkpoint decide what one must hold; a tied head is optional."""
    model_type = config.get("model_type")
    family = by_model_type(model_type if isinstance(model_type, str) else repr(model_type))
    dims = family.dims_from_config(config)
    shapes = {p.name: p.shape for p in family.network(dims)}
    outputs = plan_outputs(family, shapes, dims, WeightLayout()).outputs
    tied = {
        name for row in family.table.rows if isinstance(row, TiedHead) for name in row.targets()
    }
    optional = tied if dims.tie_word_embeddings else set()
    return ExpectedTensors(
        {t.name: t.shape for t in outputs if t.name not in optional},
        {t.name: t.shape for t in outputs if t.name in optional},
    )
