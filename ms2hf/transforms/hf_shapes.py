"""The tensors a Hugging Face checkpoint must hold, from its ``config.json`` alone.

``verify`` compares a folder with this, so that a checkpoint whose config and weights disagree
(a layer missing, a wrong head count) is caught before a loader trips over it. One function per
``model_type`` in ``EXPECTED``; Qwen3-MoE reuses the attention and norm tensors and brings its
own MLP, chosen per layer by Hugging Face's rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ms2hf.errors import ModelError
from ms2hf.transforms.qwen3_moe import dense_layers

Shapes = dict[str, tuple[int, ...]]
Config = Mapping[str, Any]


@dataclass(frozen=True)
class ExpectedTensors:
    required: Shapes
    optional: Shapes
    """Tensors a checkpoint may omit (``lm_head.weight`` when the embeddings are tied)."""


def config_int(config: Config, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelError(f"config.json: {key} is {value!r}, expected a non-negative integer")
    return value


def _mlp(prefix: str, hidden: int, ffn: int) -> Shapes:
    return {
        prefix + "gate_proj.weight": (ffn, hidden),
        prefix + "up_proj.weight": (ffn, hidden),
        prefix + "down_proj.weight": (hidden, ffn),
    }


def dense_mlp(config: Config, layer: int) -> Shapes:
    h, f = config_int(config, "hidden_size"), config_int(config, "intermediate_size")
    return _mlp(f"model.layers.{layer}.mlp.", h, f)


MlpShapes = Callable[[Config, int], Shapes]
"""A layer's MLP tensors, given the config and the layer number."""


def moe_mlp(config: Config) -> MlpShapes:
    """Router and experts for every layer but those Hugging Face's rule makes dense
    (``qwen3_moe.dense_layers``: listed in ``mlp_only_layers``, or ``layer + 1`` not a multiple
    of ``decoder_sparse_step``)."""
    step = config_int(config, "decoder_sparse_step", 1)
    only = config.get("mlp_only_layers") or []
    if step == 0 or not isinstance(only, list):
        raise ModelError(
            "config.json: decoder_sparse_step must be positive, mlp_only_layers a list"
        )
    dense = dense_layers(step, tuple(only), config_int(config, "num_hidden_layers"))

    def mlp(config: Config, layer: int) -> Shapes:
        if layer in dense:
            return dense_mlp(config, layer)
        h, e = config_int(config, "hidden_size"), config_int(config, "num_experts")
        f = config_int(config, "moe_intermediate_size")
        p = f"model.layers.{layer}.mlp."
        shapes: Shapes = {p + "gate.weight": (e, h)}
        for expert in range(e):
            shapes |= _mlp(f"{p}experts.{expert}.", h, f)
        return shapes

    return mlp


def qwen3_tensors(config: Config, mlp: MlpShapes = dense_mlp) -> ExpectedTensors:
    h, v = config_int(config, "hidden_size"), config_int(config, "vocab_size")
    heads = config_int(config, "num_attention_heads")
    groups = config_int(config, "num_key_value_heads", heads)
    d = config_int(config, "head_dim", h // heads if heads else None)
    required: Shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(config_int(config, "num_hidden_layers")):
        p = f"model.layers.{i}."
        required |= {
            p + "self_attn.q_proj.weight": (heads * d, h),
            p + "self_attn.k_proj.weight": (groups * d, h),
            p + "self_attn.v_proj.weight": (groups * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        required |= mlp(config, i)
    head = {"lm_head.weight": (v, h)}
    if config.get("tie_word_embeddings", False):
        return ExpectedTensors(required, head)
    return ExpectedTensors(required | head, {})


EXPECTED: dict[str, Callable[[Config], ExpectedTensors]] = {
    "qwen3": qwen3_tensors,
    "qwen3_moe": lambda config: qwen3_tensors(config, moe_mlp(config)),
}


def expected_tensors(config: Config) -> ExpectedTensors:
    model_type = config.get("model_type")
    rule = EXPECTED.get(model_type) if isinstance(model_type, str) else None
    if rule is None:
        raise ModelError(
            f"config.json: model_type {model_type!r} has no shape rules (known: "
            f"{', '.join(sorted(EXPECTED))})"
        )
    return rule(config)
