"""Which model a set of parameters is, and its Hugging Face form: tensors and config.

The model is recognised from the keys present, not from flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ms2hf.errors import ModelError
from ms2hf.transforms import qwen3
from ms2hf.transforms.hf_config import ConfigValue, build_config
from ms2hf.transforms.rules import OutputTensor

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


def detect_model_type(shapes: Shapes) -> str:
    if qwen3.EMBEDDING not in shapes:
        raise ModelError(
            f"no {qwen3.EMBEDDING!r} among the parameters; is this a Qwen3 training checkpoint?"
        )
    return "qwen3"


def hf_model(shapes: Shapes, given: Mapping[str, tuple[Any, str]], out_dtype: str) -> HfModel:
    """Plan the Hugging Face tensors and config of a checkpoint, checking ``given`` values
    (flags, yaml entries: ``{name: (value, origin)}``) against the shapes."""
    model_type = detect_model_type(shapes)
    dims = qwen3.infer_dims(shapes)
    qwen3.check_given(dims, given, qwen3.DIM_SOURCES)
    outputs = qwen3.output_tensors(shapes, dims, layout_from(given))
    config = build_config("Qwen3ForCausalLM", model_type, dims, out_dtype, given)
    return HfModel(model_type, dims, tuple(outputs), config)
