"""Qwen3-MoE: the dense Qwen3 family plus router and grouped experts (``docs/qwen3-moe.md``).

Attention, norms, embedding and head are the dense model's; only a layer's MLP differs. A layer
has experts when its keys say so (router, ``experts.weight1``/``weight2``), otherwise it is a dense
MLP: which layers are dense is read from the checkpoint, never assumed from ``mlp_only_layers`` or
``decoder_sparse_step``, and those two config values are derived from it.

MindSpore stores all experts of a layer as two grouped GEMM operands, ``[E*H, 2*Fm]`` and
``[E*Fm, H]``, i.e. transposed relative to Hugging Face's per-expert ``[out, in]`` weights. Every
expert tensor is therefore one transposed window of its source, which the executor fills band by
band straight from the (possibly expert-parallel) blocks, so no layer's grouped tensor is ever
held in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ms2hf.errors import ModelError
from ms2hf.io.config_files import Given
from ms2hf.transforms import qwen3
from ms2hf.transforms.family import ModelFamily, NetworkParam, Role, Routing
from ms2hf.transforms.mappings import (
    EXPERT,
    LAYER,
    GroupedExperts,
    Rename,
    Row,
    Skip,
    Table,
    layer_keys,
)

Shapes = qwen3.Shapes

ROUTER = qwen3.LAYER_PREFIX + "mlp.router.weight"
W1 = qwen3.LAYER_PREFIX + "mlp.experts.weight1"
W2 = qwen3.LAYER_PREFIX + "mlp.experts.weight2"
EXPERT_KEYS = (ROUTER, W1, W2)
FI_ACCU = qwen3.LAYER_PREFIX + "mlp.router.fi_accu"
"""Per-expert token counts accumulated for load balancing in training, not a weight: skipped."""
SPARSITY_KEYS = ("decoder_sparse_step", "mlp_only_layers")
EXPERTS = "experts"
HF_EXPERT = f"{qwen3.HF_LAYER}mlp.experts.{EXPERT}."

MOE_MLP_ROWS: tuple[Row, ...] = (
    Rename(ROUTER, qwen3.HF_LAYER + "mlp.gate.weight", EXPERTS),
    GroupedExperts(W1, (HF_EXPERT + "gate_proj.weight", HF_EXPERT + "up_proj.weight"), EXPERTS),
    GroupedExperts(W2, (HF_EXPERT + "down_proj.weight",), EXPERTS, scaled=True),
    Skip(FI_ACCU, EXPERTS),
)
TABLE = Table(
    qwen3.HEAD_ROWS
    + qwen3.ATTENTION_ROWS
    + qwen3.DENSE_MLP_ROWS
    + MOE_MLP_ROWS
    + qwen3.NORM_ROWS
    + qwen3.TAIL_ROWS,
    layer_groups=(qwen3.ATTENTION, qwen3.NORMS),
    mlp_groups=(qwen3.DENSE_MLP, EXPERTS),
    lora=qwen3.LORA_TARGETS,
)

DEFAULTS: dict[str, Any] = {
    **qwen3.DEFAULTS,
    "intermediate_size": 6144,
    "norm_topk_prob": True,
    "num_experts_per_tok": 8,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}
"""From the published Qwen3-MoE configs (Qwen3-30B-A3B; 235B-A22B differs only in sizes). Routing
is not in the weights: top-k and its normalisation come from the training yaml or these.
``intermediate_size`` sizes only dense layers (``mlp_only_layers``); with none, no weight has it
and no loader uses it, so unless the yaml gives it, it is 30B-A3B's."""


@dataclass(frozen=True)
class MoeDims(qwen3.Dims):
    """A Qwen3-MoE model's sizes; every field is a config.json entry read off the tensors."""

    num_experts: int
    moe_intermediate_size: int
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]


DIM_SOURCES = {
    **qwen3.DIM_SOURCES,
    "intermediate_size": f"the dense layers' {qwen3.FC1} rows / 2",
    "num_experts": f"{ROUTER} rows",
    "moe_intermediate_size": f"{W2} rows / num_experts",
}


def is_moe_layer(keys: Mapping[str, str]) -> bool:
    return any(k in keys for k in EXPERT_KEYS)


def has_experts(shapes: Shapes) -> bool:
    """Whether any layer of the checkpoint is a MoE layer: how Qwen3-MoE is recognised."""
    return qwen3.EMBEDDING in shapes and any(
        is_moe_layer(keys) for keys in layer_keys(shapes).values()
    )


def expert_sizes(i: int, keys: Mapping[str, str], shapes: Shapes) -> tuple[int, int, int]:
    """``(experts, hidden, expert ffn)`` of MoE layer ``i``, its three tensors checked against
    each other."""
    missing = [k.replace(LAYER, str(i)) for k in EXPERT_KEYS if k not in keys]
    if missing:
        raise ModelError(f"layer {i} lacks {', '.join(missing)}")
    router, w1, w2 = (keys[k] for k in EXPERT_KEYS)
    if len(shapes[router]) != 2 or len(shapes[w1]) != 2 or len(shapes[w2]) != 2:
        raise ModelError(
            f"layer {i}: {router} {list(shapes[router])}, {w1} {list(shapes[w1])} and {w2} "
            f"{list(shapes[w2])} must all be matrices"
        )
    experts, hidden = shapes[router]
    rows1, cols1 = shapes[w1]
    rows2, cols2 = shapes[w2]
    ffn = cols1 // 2
    if rows1 != experts * hidden or cols1 % 2:
        raise ModelError(
            f"{w1} has shape {list(shapes[w1])}; with {experts} experts of hidden size {hidden} "
            f"(from {router}) it must be [{experts * hidden}, 2 * moe_intermediate_size]"
        )
    if (rows2, cols2) != (experts * ffn, hidden):
        raise ModelError(
            f"{w2} has shape {list(shapes[w2])}; with {experts} experts, hidden size {hidden} and "
            f"moe_intermediate_size {ffn} (from {w1}) it must be [{experts * ffn}, {hidden}]"
        )
    return experts, hidden, ffn


def dense_layers(step: int, mlp_only: tuple[int, ...], num_layers: int) -> frozenset[int]:
    """Hugging Face's rule: layer i has experts iff it is not in ``mlp_only_layers`` and
    ``(i + 1) % decoder_sparse_step == 0``."""
    return frozenset(i for i in range(num_layers) if i in mlp_only or (i + 1) % step)


def sparse_layout(dense: frozenset[int], num_layers: int) -> tuple[int, tuple[int, ...]]:
    """``(decoder_sparse_step, mlp_only_layers)`` that make exactly ``dense`` the dense layers:
    the step alone when one explains them (as a training yaml would say it), else step 1 and
    the list."""
    for step in range(1, num_layers + 1):
        if dense_layers(step, (), num_layers) == dense:
            return step, ()
    return 1, tuple(sorted(dense))


def infer_dims(shapes: Shapes) -> MoeDims:
    base = qwen3.infer_dims(shapes)
    layers = layer_keys(shapes)
    sizes = {i: expert_sizes(i, keys, shapes) for i, keys in layers.items() if is_moe_layer(keys)}
    first = min(sizes)
    for i, s in sizes.items():
        if s[0] != sizes[first][0] or s[2] != sizes[first][2]:
            raise ModelError(
                f"layer {i} has {s[0]} experts of ffn size {s[2]}, layer {first} has "
                f"{sizes[first][0]} of {sizes[first][2]}; Qwen3-MoE has one size for all layers"
            )
        if s[1] != base.hidden_size:
            raise ModelError(
                f"{ROUTER.replace(LAYER, str(i))} has {s[1]} columns, but the hidden size is "
                f"{base.hidden_size} ({qwen3.EMBEDDING} columns)"
            )
    step, mlp_only = sparse_layout(frozenset(layers) - frozenset(sizes), len(layers))
    return MoeDims(
        **dataclasses.asdict(base),
        num_experts=sizes[first][0],
        moe_intermediate_size=sizes[first][2],
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
    )


def _sparsity_problems(dims: MoeDims, given: Given) -> list[str]:
    """Given ``decoder_sparse_step`` / ``mlp_only_layers`` must make the same layers dense as the
    checkpoint has; they are compared by meaning, since several pairs say the same thing."""
    named = {k: given[k] for k in SPARSITY_KEYS if k in given}
    if not named:
        return []
    origins = " and ".join(f"{g.origin} = {g.value!r}" for g in named.values())
    step = named["decoder_sparse_step"].value if "decoder_sparse_step" in named else 1
    only = named["mlp_only_layers"].value if "mlp_only_layers" in named else ()
    only = only or ()  # null means none, as in transformers
    if (
        not isinstance(step, int)
        or step < 1
        or not isinstance(only, (list, tuple))
        or not all(isinstance(i, int) for i in only)
    ):
        return [f"{origins}: expected a positive step and a list of layer numbers"]
    n = dims.num_hidden_layers
    claimed = dense_layers(step, tuple(only), n)
    actual = dense_layers(dims.decoder_sparse_step, dims.mlp_only_layers, n)
    if claimed != actual:
        return [
            f"{origins} make layers {sorted(claimed)} dense, but the checkpoint has dense MLPs "
            f"({qwen3.FC1}) in layers {sorted(actual)} and experts in the others"
        ]
    return []


def check_given(dims: MoeDims, given: Given) -> list[str]:
    """Sizes as for dense Qwen3, the dense/MoE layer pattern by meaning, and top-k against the
    expert count (the one routing value the weights bound but cannot tell)."""
    problems = _sparsity_problems(dims, given)
    sizes = {k: v for k, v in given.items() if k not in SPARSITY_KEYS}
    problems += qwen3.size_problems(dims, sizes, DIM_SOURCES)
    top_k = given.get("num_experts_per_tok")
    if top_k is not None and (
        not isinstance(top_k.value, int) or not 1 <= top_k.value <= dims.num_experts
    ):
        problems.append(
            f"{top_k.origin} = {top_k.value!r}: the router has {dims.num_experts} experts "
            f"({DIM_SOURCES['num_experts']}), so num_experts_per_tok must be 1..{dims.num_experts}"
        )
    return problems


ROUTING_SCALE = "routed_scaling_factor"
"""The yaml's routing scale (also spelled ``moe_router_topk_scaling_factor``)."""
ROUTING_SETTINGS = frozenset(
    {
        ROUTING_SCALE,
        "moe_router_score_function",
        "moe_router_enable_expert_bias",
        "moe_router_num_groups",
        "moe_router_group_topk",
    }
)
"""Routing settings of the training run that Hugging Face's Qwen3-MoE has no entry for."""
FOLD, IGNORE = "--fold-routing-scale", "--ignore-routing-scale"


def _routing_scale(scale: Any, origin: str, policy: str | None) -> Routing:
    """A routing scale multiplies every routing weight; the layer's output is linear in each
    expert's ``down_proj``, so folding it there gives the same model (``docs/qwen3-moe.md``)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 1e6:
        return Routing((f"{origin} = {scale!r}: expected a positive number",))
    if scale == 1:
        return Routing()
    if policy == "fold":
        return Routing(
            expert_scale=float(scale),
            notes=(
                f"{origin} = {scale}: every expert's down_proj is multiplied by {scale} (in fp32, "
                "before the output cast): Hugging Face's Qwen3-MoE has no routing scale, and this "
                "is the same model",
            ),
        )
    if policy == "ignore":
        return Routing(
            notes=(
                f"{origin} = {scale} is dropped ({IGNORE}): the converted model routes without "
                "it, so its outputs differ from the trained model's",
            ),
        )
    return Routing(
        (
            f"{origin} = {scale}: Hugging Face's Qwen3-MoE has no routing scale, so config.json "
            f"cannot carry it; pass {FOLD} to multiply every expert's down_proj by {scale} (the "
            f"same model), or {IGNORE} to convert the weights as trained and accept a model "
            "that routes without it",
        )
    )


def routing(dims: MoeDims, given: Given, policy: str | None) -> Routing:
    """The training run's routing, as Hugging Face's Qwen3-MoE can state it: top-k and
    ``norm_topk_prob`` go to config.json (checked in ``check_given``); softmax scores without
    expert bias or expert groups are the only routing it has; a scale is folded or dropped only
    when asked."""
    problems = []
    score = given.get("moe_router_score_function")
    if score is not None and score.value != "softmax":
        problems.append(
            f"{score.origin} = {score.value!r}: Hugging Face's Qwen3-MoE routes with softmax "
            "scores only"
        )
    bias = given.get("moe_router_enable_expert_bias")
    if bias is not None and bias.value:
        problems.append(
            f"{bias.origin} = {bias.value!r}: Hugging Face's Qwen3-MoE has no expert bias in "
            "its routing"
        )
    for name in ("moe_router_num_groups", "moe_router_group_topk"):
        groups = given.get(name)
        if groups is not None and groups.value not in (None, 1):
            problems.append(
                f"{groups.origin} = {groups.value!r}: Hugging Face's Qwen3-MoE has no "
                "group-limited routing"
            )
    scale = given.get(ROUTING_SCALE)
    if scale is None:
        return Routing(tuple(problems))
    made = _routing_scale(scale.value, scale.origin, policy)
    return Routing((*problems, *made.problems), made.expert_scale, made.notes)


def moe_mlp_network(d: MoeDims, i: int) -> list[NetworkParam]:
    """A MoE layer's MLP in the network's order: router, its statistic, the grouped experts."""
    e, h, f = d.num_experts, d.hidden_size, d.moe_intermediate_size
    params = [
        (ROUTER, (e, h), Role.ROUTER, None),
        (FI_ACCU, (e,), Role.ROUTER_STATISTIC, "F32"),
        (W1, (e * h, 2 * f), Role.EXPERTS_IN, None),
        (W2, (e * f, h), Role.EXPERTS_OUT, None),
    ]
    return [NetworkParam(n.replace(LAYER, str(i)), s, r, dt) for n, s, r, dt in params]


def network(d: MoeDims) -> list[NetworkParam]:
    dense = dense_layers(d.decoder_sparse_step, d.mlp_only_layers, d.num_hidden_layers)
    mlps = [
        qwen3.dense_mlp_network(d, i) if i in dense else moe_mlp_network(d, i)
        for i in range(d.num_hidden_layers)
    ]
    return qwen3.network_around(d, mlps)


def dims_from_config(config: Mapping[str, Any]) -> MoeDims:
    step = qwen3.config_int(config, "decoder_sparse_step", 1)
    only = config.get("mlp_only_layers") or []
    if step == 0 or not isinstance(only, list):
        raise ModelError(
            "config.json: decoder_sparse_step must be positive, mlp_only_layers a list"
        )
    base = qwen3.dims_from_config({"intermediate_size": 0, **config})
    return MoeDims(
        **dataclasses.asdict(base),
        num_experts=qwen3.config_int(config, "num_experts"),
        moe_intermediate_size=qwen3.config_int(config, "moe_intermediate_size"),
        decoder_sparse_step=step,
        mlp_only_layers=tuple(only),
    )


EXAMPLE = MoeDims(
    **vars(qwen3.EXAMPLE),
    num_experts=16,
    moe_intermediate_size=128,
    decoder_sparse_step=1,
    mlp_only_layers=(0,),
)
"""Sixteen experts per layer and one dense layer."""

FAMILY = ModelFamily(
    name="qwen3-moe",
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    dims_type=MoeDims,
    matches=has_experts,
    infer_dims=infer_dims,
    check_given=check_given,
    defaults=DEFAULTS,
    table=TABLE,
    network=network,
    dims_from_config=dims_from_config,
    example=EXAMPLE,
    aliases=("qwen3_moe",),
    evidence=f"its layers have {ROUTER} and {W1}",
    settings=ROUTING_SETTINGS,
    routing=routing,
)
