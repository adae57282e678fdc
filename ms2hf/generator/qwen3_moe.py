"""Qwen3-MoE as MindSpore Transformers trains it: the dense network, with experts in the MLP.

Read off the genuine MoE fixture's strategy files: a MoE layer's router and grouped experts
live on a device matrix of their own, ``(devices per stage / ep, ep)``, the experts split whole
along dim 0 over the ep axis (the last, so expert groups alternate fastest over local ranks) and
the router replicated. The router's ``fi_accu`` load statistic is laid out in the flat form over
``(devices per stage,)``; ``TopKRouter`` creates it in float32 whatever ``params_dtype`` says,
with ``requires_grad=False, parallel_optimizer=False``, so it has no Adam states and is never
optimizer-sharded. Attention, norms and dense layers are the dense model's.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ms2hf.generator import qwen3
from ms2hf.generator.config import GeneratorConfig, MoeConfig
from ms2hf.generator.params import ModelSpec, ParamSpec
from ms2hf.generator.qwen3 import Op, TensorMap, node
from ms2hf.io.sources.strategy import NOT_SPLIT
from ms2hf.transforms.qwen3_moe import FI_ACCU, ROUTER, W1, W2

NETWORK = qwen3.NETWORK_PREFIX + "network-TrainingQwen3MoeForCausalLM"
EP_AXIS = 0
"""ep is the last axis of ``(devices / ep, ep)``."""
EXPERTS: TensorMap = ((EP_AXIS,), (NOT_SPLIT,))
REPLICATED: TensorMap = ((NOT_SPLIT,), (NOT_SPLIT,))
FLAT_REPLICATED: TensorMap = ((NOT_SPLIT,),)
FI_ACCU_DTYPE = "F32"

_ROUTER_OP: Op = ("TopKRouter", "linear[1]")
_FI_ACCU_OP: Op = ("TopKRouter", "add_accu[0]")
_W1_OP: Op = ("FFNGroupedGEMM", "morphed_forward[3]")
_W2_OP: Op = ("FFNGroupedGEMM", "morphed_forward[4]")


def _mlp(moe: MoeConfig, c: GeneratorConfig, i: int, stage: int) -> list[ParamSpec]:
    """Layer ``i``'s MLP in network order: router, its statistic, then the grouped experts."""
    if i in c.dense_layers:
        return qwen3.dense_mlp(c, i, stage)
    e, h, f = moe.experts, c.hidden, moe.moe_ffn
    experts_dev = (c.devices_per_stage // moe.ep, moe.ep)
    p = f"decoder.layers.{i}."

    def param(
        suffix: str,
        shape: tuple[int, ...],
        dev: tuple[int, ...],
        tensor_map: TensorMap,
        op: Op,
        **statistic: Any,
    ) -> ParamSpec:
        name = p + suffix
        return ParamSpec(name, shape, stage, dev, tensor_map, node(name, op), **statistic)

    return [
        param(ROUTER, (e, h), experts_dev, REPLICATED, _ROUTER_OP),
        param(
            FI_ACCU,
            (e,),
            (c.devices_per_stage,),
            FLAT_REPLICATED,
            _FI_ACCU_OP,
            training_only=True,
            dtype=FI_ACCU_DTYPE,
        ),
        param(W1, (e * h, 2 * f), experts_dev, EXPERTS, _W1_OP),
        param(W2, (e * f, h), experts_dev, EXPERTS, _W2_OP),
    ]


def _routing(moe: MoeConfig) -> dict[str, Any]:
    """The MoE entries of both ``config.json`` and the yaml, in the fixture's order."""
    return {
        "num_experts": moe.experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.moe_ffn,
        "norm_topk_prob": True,
        "decoder_sparse_step": moe.decoder_sparse_step,
        "mlp_only_layers": list(moe.mlp_only_layers),
    }


def model_spec(c: GeneratorConfig, moe: MoeConfig) -> ModelSpec:
    return ModelSpec(
        NETWORK,
        qwen3.params(c, partial(_mlp, moe)),
        {**qwen3.hf_config(c, "Qwen3MoeForCausalLM", "qwen3_moe"), **_routing(moe)},
        {**qwen3.model_config(c), **_routing(moe)},
    )
