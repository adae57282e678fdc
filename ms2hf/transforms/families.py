"""Which model a set of parameters is, and its Hugging Face form: tensors and config.

The model is recognised from the keys present, not from flags.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from ms2hf.errors import ModelError
from ms2hf.transforms import qwen3, qwen3_moe
from ms2hf.transforms.hf_config import ConfigValue, build_config
from ms2hf.transforms.pieces import OutputTensor

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class HfModel:
    model_type: str
    dims: object
    outputs: tuple[OutputTensor, ...]
    config: dict[str, ConfigValue]


def layout_from(given: Mapping[str, tuple[Any, str]]) -> qwen3.WeightLayout:
    """The fused-weight layout flags of the training yaml, defaults where absent."""
    defaults = qwen3.WeightLayout()
    contiguous = given.get("use_contiguous_weight_layout_attention", (defaults.contiguous_qkv, ""))[0]
    interleaved = given.get("use_interleaved_weight_layout_mlp", (defaults.interleaved_fc1, ""))[0]
    return qwen3.WeightLayout(contiguous_qkv=bool(contiguous), interleaved_fc1=bool(interleaved))


@dataclass(frozen=True)
class ModelRules:
    """What one supported model brings: its Hugging Face class and its shape rules."""

    architecture: str
    infer_dims: Callable[[Shapes], Any]
    check_given: Callable[[Any, Mapping[str, tuple[Any, str]]], None]
    output_tensors: Callable[[Shapes, Any, qwen3.WeightLayout], list[OutputTensor]]


MODELS = {
    "qwen3": ModelRules(
        "Qwen3ForCausalLM",
        qwen3.infer_dims,
        partial(qwen3.check_given, sources=qwen3.DIM_SOURCES),
        qwen3.output_tensors,
    ),
    "qwen3_moe": ModelRules(
        "Qwen3MoeForCausalLM", qwen3_moe.infer_dims, qwen3_moe.check_given, qwen3_moe.output_tensors
    ),
}


def detect_model_type(shapes: Shapes) -> str:
    if qwen3.EMBEDDING not in shapes:
        raise ModelError(
            f"no {qwen3.EMBEDDING!r} among the parameters; is this a Qwen3 training checkpoint?"
        )
    return "qwen3_moe" if qwen3_moe.has_experts(shapes) else "qwen3"


def hf_model(shapes: Shapes, given: Mapping[str, tuple[Any, str]], out_dtype: str) -> HfModel:
    """Plan the Hugging Face tensors and config of a checkpoint, checking ``given`` values
    (flags, yaml entries: ``{name: (value, origin)}``) against the shapes."""
    model_type = detect_model_type(shapes)
    rules = MODELS[model_type]
    dims = rules.infer_dims(shapes)
    rules.check_given(dims, given)
    outputs = rules.output_tensors(shapes, dims, layout_from(given))
    config = build_config(rules.architecture, model_type, dims, out_dtype, given)
    return HfModel(model_type, dims, tuple(outputs), config)
