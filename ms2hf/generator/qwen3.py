"""Qwen3 (dense) as MindSpore Transformers trains it: parameter names, shapes, stages, layouts.

Everything here was read off the genuine fixtures' strategy files: the device matrix is
``[dp, cp, tp]`` with cp = 1; column-parallel weights (and the vocab-parallel embedding) split
dim 0 over tp, row-parallel weights dim 1; norms are replicated. Layers are split evenly over the
pipeline stages, with the embedding on the first and the final norm and output layer on the last;
a tied model has no output layer at all. How fused weights are laid out inside a tensor is not
here: the expected Hugging Face tensors are scattered into these through ``ms2hf.transforms``.

Qwen3-MoE differs only in a layer's MLP, so the network around it is built here for both, with
the MLP passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ms2hf.generator.config import GeneratorConfig
from ms2hf.generator.params import ModelSpec, ParamSpec
from ms2hf.io.sources.strategy import NOT_SPLIT
from ms2hf.transforms.hf_config import DTYPE_NAMES
from ms2hf.transforms.qwen3 import EMBEDDING, FC1, FINAL_NORM, O_PROJ, OUTPUT_LAYER, Q_NORM, QKV

TensorMap = tuple[tuple[int, ...], ...]
Op = tuple[str, str]
"""The owning cell's class and the call that uses the weight, for the strategy's node names."""

NETWORK_PREFIX = "Default/network-MFPipelineWithLossScaleCell/network-PipelineCellWithTwoOutput/"
NETWORK = NETWORK_PREFIX + "network-TrainingQwen3ForCausalLM"
TP_AXIS = 0
"""tp is the last axis of ``[dp, cp, tp]``; tensor maps count axes from the right."""
COLUMN: TensorMap = ((TP_AXIS,), (NOT_SPLIT,))
ROW: TensorMap = ((NOT_SPLIT,), (TP_AXIS,))
NORM: TensorMap = ((NOT_SPLIT,), ())

_EMBEDDING_OP: Op = ("VocabParallelEmbedding", "embedding_morph[1]")
_NORM_OP: Op = ("FusedRMSNorm", "norm[1]")
_COLUMN_OP: Op = ("ColumnParallelLinear", "morphed_forward[1]")
_ROW_OP: Op = ("RowParallelLinear", "morphed_forward[1]")

MlpParams = Callable[[GeneratorConfig, int, int], list[ParamSpec]]
"""Layer ``i``'s MLP parameters on pipeline stage ``s``: ``mlp(config, i, s)``."""


def node(name: str, op: Op) -> str:
    """The op's node: the owning cell's path (the name without its last part) and the call."""
    module, call = op
    return f"model-{name.rsplit('.', 1)[0].replace('.', '-')}-{module}/{call}"


def dense_param(
    c: GeneratorConfig, stage: int, name: str, shape: tuple[int, ...], tensor_map: TensorMap, op: Op
) -> ParamSpec:
    """A parameter on the ``[dp, cp, tp]`` device matrix of embedding, attention and dense MLP."""
    return ParamSpec(name, shape, stage, (c.dp, 1, c.tp), tensor_map, node(name, op))


def _attention(c: GeneratorConfig, i: int, stage: int) -> list[ParamSpec]:
    """A layer's norms and attention, in network order (the MLP follows them)."""
    h, d = c.hidden, c.head_dim
    p = f"decoder.layers.{i}."
    weights = [
        (p + "input_layernorm.weight", (h,), NORM, _NORM_OP),
        (p + O_PROJ, (h, c.heads * d), ROW, _ROW_OP),
        (p + QKV, ((c.heads + 2 * c.groups) * d, h), COLUMN, _COLUMN_OP),
        (p + Q_NORM, (d,), NORM, _NORM_OP),
        (p + "self_attention.k_layernorm.weight", (d,), NORM, _NORM_OP),
        (p + "pre_mlp_layernorm.weight", (h,), NORM, _NORM_OP),
    ]
    return [dense_param(c, stage, *w) for w in weights]


def dense_mlp(c: GeneratorConfig, i: int, stage: int) -> list[ParamSpec]:
    p = f"decoder.layers.{i}."
    return [
        dense_param(c, stage, p + FC1, (2 * c.ffn, c.hidden), COLUMN, _COLUMN_OP),
        dense_param(c, stage, p + "mlp.linear_fc2.weight", (c.hidden, c.ffn), ROW, _ROW_OP),
    ]


def params(c: GeneratorConfig, mlp: MlpParams) -> tuple[ParamSpec, ...]:
    """Every parameter in network order, layers spread evenly over the stages."""
    last = c.pp - 1
    per_stage = c.layers // c.pp
    out = [dense_param(c, 0, EMBEDDING, (c.vocab, c.hidden), COLUMN, _EMBEDDING_OP)]
    for i in range(c.layers):
        out += _attention(c, i, i // per_stage) + mlp(c, i, i // per_stage)
    out.append(dense_param(c, last, FINAL_NORM, (c.hidden,), NORM, _NORM_OP))
    if not c.tied:
        out.append(dense_param(c, last, OUTPUT_LAYER, (c.vocab, c.hidden), COLUMN, _COLUMN_OP))
    return tuple(out)


def _sizes(c: GeneratorConfig) -> dict[str, Any]:
    return {
        "hidden_size": c.hidden,
        "intermediate_size": c.ffn,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.groups,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab,
        "tie_word_embeddings": c.tied,
    }


def hf_config(c: GeneratorConfig, architecture: str, model_type: str) -> dict[str, Any]:
    """The entries every Qwen3 family's ``config.json`` has, in the fixtures' order."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        **_sizes(c),
        "torch_dtype": DTYPE_NAMES[c.source_dtype],
    }


def model_config(c: GeneratorConfig) -> dict[str, Any]:
    """The training yaml's sizes and weight layout flags."""
    return {
        **_sizes(c),
        "params_dtype": DTYPE_NAMES[c.source_dtype],
        "use_contiguous_weight_layout_attention": c.contiguous_qkv,
        "use_interleaved_weight_layout_mlp": c.interleaved_fc1,
    }


def model_spec(c: GeneratorConfig) -> ModelSpec:
    return ModelSpec(
        NETWORK,
        params(c, dense_mlp),
        hf_config(c, "Qwen3ForCausalLM", "qwen3"),
        model_config(c),
    )
