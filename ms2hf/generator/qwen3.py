"""Qwen3 (dense) as MindSpore Transformers trains it: parameter names, shapes, stages, layouts.

Everything here was read off the genuine fixtures' strategy files: the device matrix is
``[dp, cp, tp]`` with cp = 1; column-parallel weights (and the vocab-parallel embedding) split
dim 0 over tp, row-parallel weights dim 1; norms are replicated. Layers are split evenly over the
pipeline stages, with the embedding on the first and the final norm and output layer on the last;
a tied model has no output layer at all. How fused weights are laid out inside a tensor is not
here: the expected Hugging Face tensors are scattered into these through ``ms2hf.transforms``.
"""

from __future__ import annotations

from ms2hf.generator.config import GeneratorConfig
from ms2hf.generator.params import ModelSpec, ParamSpec
from ms2hf.io.strategy import NOT_SPLIT
from ms2hf.transforms.qwen3 import EMBEDDING, FC1, FINAL_NORM, O_PROJ, OUTPUT_LAYER, Q_NORM, QKV

TensorMap = tuple[tuple[int, ...], ...]
Op = tuple[str, str]
"""The owning cell's class and the call that uses the weight, for the strategy's node names."""

NETWORK = (
    "Default/network-MFPipelineWithLossScaleCell/network-PipelineCellWithTwoOutput/"
    "network-TrainingQwen3ForCausalLM"
)
TP_AXIS = 0
"""tp is the last axis of ``[dp, cp, tp]``; tensor maps count axes from the right."""
COLUMN: TensorMap = ((TP_AXIS,), (NOT_SPLIT,))
ROW: TensorMap = ((NOT_SPLIT,), (TP_AXIS,))
NORM: TensorMap = ((NOT_SPLIT,), ())

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
_EMBEDDING_OP: Op = ("VocabParallelEmbedding", "embedding_morph[1]")
_NORM_OP: Op = ("FusedRMSNorm", "norm[1]")
_COLUMN_OP: Op = ("ColumnParallelLinear", "morphed_forward[1]")
_ROW_OP: Op = ("RowParallelLinear", "morphed_forward[1]")


def _layer(c: GeneratorConfig, i: int) -> list[tuple[str, tuple[int, ...], TensorMap, Op]]:
    """One decoder layer's parameters in network order: (name, shape, tensor map, op)."""
    h, d = c.hidden, c.head_dim
    p = f"decoder.layers.{i}."
    return [
        (p + "input_layernorm.weight", (h,), NORM, _NORM_OP),
        (p + O_PROJ, (h, c.heads * d), ROW, _ROW_OP),
        (p + QKV, ((c.heads + 2 * c.groups) * d, h), COLUMN, _COLUMN_OP),
        (p + Q_NORM, (d,), NORM, _NORM_OP),
        (p + "self_attention.k_layernorm.weight", (d,), NORM, _NORM_OP),
        (p + "pre_mlp_layernorm.weight", (h,), NORM, _NORM_OP),
        (p + FC1, (2 * c.ffn, h), COLUMN, _COLUMN_OP),
        (p + "mlp.linear_fc2.weight", (h, c.ffn), ROW, _ROW_OP),
    ]


def model_spec(c: GeneratorConfig) -> ModelSpec:
    dev = (c.dp, 1, c.tp)
    last = c.pp - 1
    per_stage = c.layers // c.pp

    def param(
        name: str, shape: tuple[int, ...], stage: int, tensor_map: TensorMap, op: Op
    ) -> ParamSpec:
        module, call = op
        node = f"model-{name.removesuffix('.weight').replace('.', '-')}-{module}/{call}"
        return ParamSpec(name, shape, stage, dev, tensor_map, node)

    params = [param(EMBEDDING, (c.vocab, c.hidden), 0, COLUMN, _EMBEDDING_OP)]
    for i in range(c.layers):
        params += [
            param(name, shape, i // per_stage, tensor_map, op)
            for name, shape, tensor_map, op in _layer(c, i)
        ]
    params.append(param(FINAL_NORM, (c.hidden,), last, NORM, _NORM_OP))
    if not c.tied:
        params.append(param(OUTPUT_LAYER, (c.vocab, c.hidden), last, COLUMN, _COLUMN_OP))

    sizes = {
        "hidden_size": c.hidden,
        "intermediate_size": c.ffn,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.groups,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab,
        "tie_word_embeddings": c.tied,
    }
    hf_config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **sizes,
        "torch_dtype": _DTYPE_NAMES[c.dtype],
    }
    model_config = {
        **sizes,
        "params_dtype": _DTYPE_NAMES[c.dtype],
        "use_contiguous_weight_layout_attention": c.contiguous_qkv,
        "use_interleaved_weight_layout_mlp": c.interleaved_fc1,
    }
    return ModelSpec(NETWORK, tuple(params), hf_config, model_config)
