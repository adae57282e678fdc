"""The training network a generated run saves: every parameter with the layout MindSpore writes.

The parameters, their shapes and their parallel roles come from the model family
(``ModelFamily.network``); this module only turns each role into what MindSpore Transformers'
layers write for it, as read off the genuine fixtures' strategy files (``docs/layout-math.md``):
embedding, attention and dense MLP weights live on the ``[dp, cp, tp]`` device matrix (cp = 1),
column-parallel weights and the vocab-parallel embedding split dim 0 over tp, row-parallel ones
dim 1, norms are replicated. A MoE layer's router and grouped experts live on a matrix of their
own, ``(devices per stage / ep, ep)``: the experts split whole along dim 0 over the ep axis, the
router replicated. The router's ``fi_accu`` statistic is laid out in the flat form over all of a
stage's devices and is never trained (no Adam states, never optimizer-sharded).
Layers are spread evenly over the pipeline stages, the embedding on the first, the final norm and
output layer on the last. A LoRA fine-tune's network is rewritten first (``ms2hf.generator.lora``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ms2hf.generator.config import GeneratorConfig
from ms2hf.generator.lora import pet_config, with_lora
from ms2hf.io.sources.strategy import NOT_SPLIT
from ms2hf.transforms.family import NetworkParam, Role
from ms2hf.transforms.hf_config import DTYPE_NAMES
from ms2hf.transforms.lora import is_lora_name
from ms2hf.transforms.mappings import layer_pattern

TensorMap = tuple[tuple[int, ...], ...]
NETWORK_PREFIX = "Default/network-MFPipelineWithLossScaleCell/network-PipelineCellWithTwoOutput/"
AXIS = 0
"""tp (or ep) is the last axis of its device matrix; tensor maps count axes from the right."""
DIM0: TensorMap = ((AXIS,), (NOT_SPLIT,))
DIM1: TensorMap = ((NOT_SPLIT,), (AXIS,))
VECTOR: TensorMap = ((NOT_SPLIT,), ())
"""A 1-D tensor gets an extra empty TensorMap in the Layout form."""
REPLICATED: TensorMap = ((NOT_SPLIT,), (NOT_SPLIT,))
FLAT_REPLICATED: TensorMap = ((NOT_SPLIT,),)


@dataclass(frozen=True)
class RoleLayout:
    """What MindSpore writes for a role: the tensor map, whether the device matrix is the MoE
    one, and the op (owning cell class, call) that names the parameter's strategy node."""

    tensor_map: TensorMap
    experts_matrix: bool
    op: tuple[str, str]


ROLES: dict[Role, RoleLayout] = {
    Role.EMBEDDING: RoleLayout(DIM0, False, ("VocabParallelEmbedding", "embedding_morph[1]")),
    Role.COLUMN: RoleLayout(DIM0, False, ("ColumnParallelLinear", "morphed_forward[1]")),
    Role.ROW: RoleLayout(DIM1, False, ("RowParallelLinear", "morphed_forward[1]")),
    Role.NORM: RoleLayout(VECTOR, False, ("FusedRMSNorm", "norm[1]")),
    Role.ROUTER: RoleLayout(REPLICATED, True, ("TopKRouter", "linear[1]")),
    Role.ROUTER_STATISTIC: RoleLayout(FLAT_REPLICATED, False, ("TopKRouter", "add_accu[0]")),
    Role.EXPERTS_IN: RoleLayout(DIM0, True, ("FFNGroupedGEMM", "morphed_forward[3]")),
    Role.EXPERTS_OUT: RoleLayout(DIM0, True, ("FFNGroupedGEMM", "morphed_forward[4]")),
    Role.REPLICATED_LINEAR: RoleLayout(REPLICATED, False, ("LinearNoTP", "morphed_forward[1]")),
}
WITH_LORA = "WithLoRA"
"""What a wrapped linear layer's class is called (``ColumnParallelLinearWithLoRA``)."""
LORA_WRAPPERS = "network-network-"
"""In a LoRA run the model sits two cells deeper (the fine-tuning wrapper), and every op's node
name says so (as the genuine LoRA fixtures' strategy files have it)."""
TRAINING_ONLY = frozenset({Role.ROUTER_STATISTIC})
"""Statistics of training, not weights: the optimizer never sees them, no Hugging Face tensor is
made of them, so they are drawn at random."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the training network, placed on a stage's devices."""

    name: str
    shape: tuple[int, ...]
    stage: int
    dev_matrix: tuple[int, ...]
    tensor_map: TensorMap
    """TensorMap entries exactly as MindSpore writes them: in the Layout form one per tensor dim
    (axes counted from the right, -1 for none) and an extra empty one for a 1-D tensor."""
    node: str
    """The op owning the parameter, as strategy files name it after the network prefix."""
    training_only: bool = False
    dtype: str | None = None
    """Its own safetensors dtype when the network fixes one; None: the run's ``params_dtype``."""
    trainable: bool = True
    """Trained: saved with Adam states, listed with gradient accumulators. A LoRA run trains its
    LoRA weights only; a statistic is never trained."""


@dataclass(frozen=True)
class ModelSpec:
    network: str
    """The prefix of every op's node name: the training cell chain of MindSpore Transformers."""
    params: tuple[ParamSpec, ...]
    """In network order, which is the order of the strategy files."""
    hf_config: dict[str, Any]
    """The model's Hugging Face configuration, as the fixtures' ``config.json`` gives it."""
    model_config: dict[str, Any]
    """The training yaml's ``model.model_config``: sizes and the weight layout flags."""


def node(name: str, op: tuple[str, str]) -> str:
    """The op's node: the owning cell's path (the name without its last part) and the call."""
    module, call = op
    return f"model-{name.rsplit('.', 1)[0].replace('.', '-')}-{module}/{call}"


def _stages(params: list[NetworkParam], c: GeneratorConfig) -> list[int]:
    """Layers evenly over the stages; what precedes the layers on the first, the rest on the
    last."""
    per_stage = c.layers // c.pp
    stages, seen_layer = [], False
    for p in params:
        layer = layer_pattern(p.name)[1]
        seen_layer |= bool(layer)
        stages.append(int(layer) // per_stage if layer else (c.pp - 1 if seen_layer else 0))
    return stages


def _place(p: NetworkParam, stage: int, c: GeneratorConfig, wrapped: frozenset[str]) -> ParamSpec:
    role = ROLES[p.role]
    op = (role.op[0] + WITH_LORA, role.op[1]) if p.name in wrapped else role.op
    training_only = p.role in TRAINING_ONLY
    if role.experts_matrix:
        ep = c.moe.ep if c.moe else 1
        dev: tuple[int, ...] = (c.devices_per_stage // ep, ep)
    elif role.tensor_map == FLAT_REPLICATED:
        dev = (c.devices_per_stage,)
    else:
        dev = (c.dp, 1, c.tp)
    return ParamSpec(
        p.name,
        p.shape,
        stage,
        dev,
        role.tensor_map,
        (LORA_WRAPPERS if c.lora is not None else "") + node(p.name, op),
        training_only=training_only,
        dtype=p.dtype,
        trainable=not training_only and (c.lora is None or is_lora_name(p.name)),
    )


def _routing(c: GeneratorConfig) -> dict[str, Any]:
    """Routing settings: in config.json and the yaml, not in the weights."""
    if c.moe is None:
        return {}
    return {"num_experts_per_tok": c.moe.top_k, "norm_topk_prob": True}


def _sizes(c: GeneratorConfig) -> dict[str, Any]:
    """The sizes as config.json states them (lists where config.json has lists)."""
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in vars(c.dims).items()
    }


def model_spec(c: GeneratorConfig) -> ModelSpec:
    family = c.family
    params = family.network(c.dims)
    wrapped: frozenset[str] = frozenset()
    if c.lora is not None:
        params, wrapped = with_lora(params, c.lora, family.table)
    stages = _stages(params, c)
    sizes = {**_sizes(c), **_routing(c)}
    fine_tune = {"pet_config": pet_config(c.lora)} if c.lora is not None else {}
    return ModelSpec(
        network=NETWORK_PREFIX + f"network-Training{family.architecture}",
        params=tuple(_place(p, s, c, wrapped) for p, s in zip(params, stages)),
        hf_config={
            "architectures": [family.architecture],
            "model_type": family.model_type,
            **sizes,
            "torch_dtype": DTYPE_NAMES[c.source_dtype],
        },
        model_config={
            **sizes,
            "params_dtype": DTYPE_NAMES[c.source_dtype],
            "use_contiguous_weight_layout_attention": c.contiguous_qkv,
            "use_interleaved_weight_layout_mlp": c.interleaved_fc1,
            **fine_tune,
        },
    )
