"""Qwen3 (dense): its names, sizes, config defaults and rename table (``docs/qwen3.md``).

The model's sizes are read off the shapes, so flags are only ever checked, never needed; a flag
that disagrees with the weights names the flag, the tensor and both values. Qwen3-MoE
(``ms2hf.transforms.qwen3_moe``) shares everything here but a layer's MLP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ms2hf.errors import ModelError
from ms2hf.io.config_files import Given
from ms2hf.transforms.family import ModelFamily, NetworkParam, Role
from ms2hf.transforms.mappings import (
    LAYER,
    GateUpSplit,
    QkvSplit,
    Rename,
    Row,
    Table,
    TiedHead,
    layer_keys,
)

Shapes = Mapping[str, tuple[int, ...]]

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYER_PREFIX = f"decoder.layers.{LAYER}."
INPUT_NORM = LAYER_PREFIX + "input_layernorm.weight"
QKV = LAYER_PREFIX + "self_attention.linear_qkv.weight"
O_PROJ = LAYER_PREFIX + "self_attention.linear_proj.weight"
Q_NORM = LAYER_PREFIX + "self_attention.q_layernorm.weight"
K_NORM = LAYER_PREFIX + "self_attention.k_layernorm.weight"
MLP_NORM = LAYER_PREFIX + "pre_mlp_layernorm.weight"
FC1 = LAYER_PREFIX + "mlp.linear_fc1.weight"
FC2 = LAYER_PREFIX + "mlp.linear_fc2.weight"

HF_LAYER = f"model.layers.{LAYER}."
ATTENTION, DENSE_MLP, NORMS = "attention", "dense MLP", "norms"

HEAD_ROWS: tuple[Row, ...] = (Rename(EMBEDDING, "model.embed_tokens.weight"),)
ATTENTION_ROWS: tuple[Row, ...] = (
    QkvSplit(
        QKV,
        HF_LAYER + "self_attn.q_proj.weight",
        HF_LAYER + "self_attn.k_proj.weight",
        HF_LAYER + "self_attn.v_proj.weight",
        ATTENTION,
    ),
    Rename(O_PROJ, HF_LAYER + "self_attn.o_proj.weight", ATTENTION),
    Rename(Q_NORM, HF_LAYER + "self_attn.q_norm.weight", ATTENTION),
    Rename(K_NORM, HF_LAYER + "self_attn.k_norm.weight", ATTENTION),
)
DENSE_MLP_ROWS: tuple[Row, ...] = (
    GateUpSplit(FC1, HF_LAYER + "mlp.gate_proj.weight", HF_LAYER + "mlp.up_proj.weight", DENSE_MLP),
    Rename(FC2, HF_LAYER + "mlp.down_proj.weight", DENSE_MLP),
)
NORM_ROWS: tuple[Row, ...] = (
    Rename(INPUT_NORM, HF_LAYER + "input_layernorm.weight", NORMS),
    Rename(MLP_NORM, HF_LAYER + "post_attention_layernorm.weight", NORMS),
)
TAIL_ROWS: tuple[Row, ...] = (
    Rename(FINAL_NORM, "model.norm.weight"),
    TiedHead("lm_head.weight", EMBEDDING, OUTPUT_LAYER),
)
LORA_TARGETS = (QKV, O_PROJ, FC1, FC2)
"""The linear layers mindformers' LoRA wraps (``docs/lora.md``): attention's and the dense MLP's;
Qwen3-MoE's dense layers too, never its router or experts."""
TABLE = Table(
    HEAD_ROWS + ATTENTION_ROWS + DENSE_MLP_ROWS + NORM_ROWS + TAIL_ROWS,
    layer_groups=(ATTENTION, NORMS),
    mlp_groups=(DENSE_MLP,),
    lora=LORA_TARGETS,
)

DEFAULTS: dict[str, Any] = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "use_cache": True,
    "use_sliding_window": False,
}
"""From the published Qwen3 configs (Qwen3-0.6B ... 235B-A22B share these)."""


@dataclass(frozen=True)
class Dims:
    """The sizes of a Qwen3 model, read off its tensors; every field is a config.json entry."""

    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int | None
    """None when no layer has a dense MLP (an all-MoE model): the weights cannot tell it."""
    tie_word_embeddings: bool


DIM_SOURCES = {
    "hidden_size": f"{EMBEDDING} columns",
    "vocab_size": f"{EMBEDDING} rows",
    "num_hidden_layers": "the count of decoder.layers.<i>",
    "num_attention_heads": f"{O_PROJ.replace(LAYER, '0')} columns / head_dim",
    "num_key_value_heads": f"{QKV.replace(LAYER, '0')} rows",
    "head_dim": f"{Q_NORM.replace(LAYER, '0')} length",
    "intermediate_size": f"{FC1.replace(LAYER, '0')} rows / 2",
    "tie_word_embeddings": f"absence of {OUTPUT_LAYER}",
}
"""Which tensor each size is read from, for messages about disagreeing values."""


def need(shapes: Shapes, name: str) -> tuple[int, ...]:
    shape = shapes.get(name)
    if shape is None:
        raise ModelError(f"parameter {name!r} is missing; a Qwen3 checkpoint must have it")
    return shape


def first_in_layers(layers: Mapping[int, Mapping[str, str]], pattern: str) -> str:
    for keys in layers.values():
        if pattern in keys:
            return keys[pattern]
    raise ModelError(f"no layer has a '{pattern}' parameter; is this a Qwen3 checkpoint?")


def infer_dims(shapes: Shapes) -> Dims:
    vocab, hidden = need(shapes, EMBEDDING)
    layers = layer_keys(shapes)
    if not layers:
        raise ModelError("no 'decoder.layers.<i>.*' parameters found")
    if list(layers) != list(range(len(layers))):
        raise ModelError(
            f"decoder layers {list(layers)} are not numbered 0..{len(layers) - 1}; "
            "a pipeline stage's rank files are missing?"
        )
    qkv = first_in_layers(layers, QKV)
    (head_dim,) = shapes[first_in_layers(layers, Q_NORM)]
    o_proj = first_in_layers(layers, O_PROJ)
    if shapes[o_proj][1] % head_dim:
        raise ModelError(
            f"{o_proj} has {shapes[o_proj][1]} columns, not a multiple of head_dim {head_dim} "
            "(the q_layernorm length)"
        )
    heads = shapes[o_proj][1] // head_dim
    qkv_rows = shapes[qkv][0]
    groups2 = qkv_rows // head_dim - heads
    if qkv_rows % head_dim or groups2 <= 0 or groups2 % 2 or heads % (groups2 // 2):
        raise ModelError(
            f"{qkv} has {qkv_rows} rows, which is not (heads + 2 * groups) * head_dim for "
            f"{heads} heads of head_dim {head_dim}"
        )
    return Dims(
        hidden_size=hidden,
        vocab_size=vocab,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        num_key_value_heads=groups2 // 2,
        head_dim=head_dim,
        intermediate_size=intermediate_size(shapes, layers),
        tie_word_embeddings=OUTPUT_LAYER not in shapes,
    )


def intermediate_size(shapes: Shapes, layers: Mapping[int, Mapping[str, str]]) -> int | None:
    """The dense MLP's size from the first layer that has one."""
    for keys in layers.values():
        if FC1 in keys:
            rows = shapes[keys[FC1]][0]
            if rows % 2:
                raise ModelError(f"{keys[FC1]} has {rows} rows; gate and up need an even count")
            return rows // 2
    return None


def size_problems(dims: object, given: Given, sources: Mapping[str, str]) -> list[str]:
    """Every given value (a flag or a file entry) that the shapes contradict."""
    problems = []
    for name, g in given.items():
        actual = getattr(dims, name, None)
        if actual is None:  # a size the weights cannot tell: nothing to check against
            continue
        ok = bool(g.value) == actual if isinstance(actual, bool) else g.value == actual
        if not ok:
            problems.append(
                f"{g.origin} = {g.value!r} disagrees with the checkpoint: "
                f"{sources.get(name, name)} gives {name} = {actual!r}"
            )
    return problems


def check_given(dims: Dims, given: Given) -> list[str]:
    return size_problems(dims, given, DIM_SOURCES)


def attention_network(d: Any, i: int) -> list[NetworkParam]:
    """A layer's norms and attention, in the network's order (its MLP follows them)."""
    h, hd = d.hidden_size, d.head_dim
    p = [
        (INPUT_NORM, (h,), Role.NORM),
        (O_PROJ, (h, d.num_attention_heads * hd), Role.ROW),
        (QKV, ((d.num_attention_heads + 2 * d.num_key_value_heads) * hd, h), Role.COLUMN),
        (Q_NORM, (hd,), Role.NORM),
        (K_NORM, (hd,), Role.NORM),
        (MLP_NORM, (h,), Role.NORM),
    ]
    return [NetworkParam(name.replace(LAYER, str(i)), shape, role) for name, shape, role in p]


def dense_mlp_network(d: Any, i: int) -> list[NetworkParam]:
    f, h = d.intermediate_size, d.hidden_size
    return [
        NetworkParam(FC1.replace(LAYER, str(i)), (2 * f, h), Role.COLUMN),
        NetworkParam(FC2.replace(LAYER, str(i)), (h, f), Role.ROW),
    ]


def network_around(d: Any, mlp: Sequence[list[NetworkParam]]) -> list[NetworkParam]:
    """Embedding, every layer (attention, then ``mlp[i]``), final norm and output layer."""
    out = [NetworkParam(EMBEDDING, (d.vocab_size, d.hidden_size), Role.EMBEDDING)]
    for i in range(d.num_hidden_layers):
        out += attention_network(d, i) + mlp[i]
    out.append(NetworkParam(FINAL_NORM, (d.hidden_size,), Role.NORM))
    if not d.tie_word_embeddings:
        out.append(NetworkParam(OUTPUT_LAYER, (d.vocab_size, d.hidden_size), Role.COLUMN))
    return out


def network(d: Dims) -> list[NetworkParam]:
    return network_around(d, [dense_mlp_network(d, i) for i in range(d.num_hidden_layers)])


def config_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelError(f"config.json: {key} is {value!r}, expected a non-negative integer")
    return value


def dims_from_config(config: Mapping[str, Any]) -> Dims:
    heads = config_int(config, "num_attention_heads")
    hidden = config_int(config, "hidden_size")
    return Dims(
        hidden_size=hidden,
        vocab_size=config_int(config, "vocab_size"),
        num_hidden_layers=config_int(config, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=config_int(config, "num_key_value_heads", heads),
        head_dim=config_int(config, "head_dim", hidden // heads if heads else None),
        intermediate_size=config_int(config, "intermediate_size"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def is_qwen3(shapes: Shapes) -> bool:
    """Any MCore decoder with a word embedding; Qwen3-MoE is tried before it."""
    return EMBEDDING in shapes


EXAMPLE = Dims(
    hidden_size=256,
    vocab_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    intermediate_size=512,
    tie_word_embeddings=False,
)

FAMILY = ModelFamily(
    name="qwen3",
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    dims_type=Dims,
    matches=is_qwen3,
    infer_dims=infer_dims,
    check_given=check_given,
    defaults=DEFAULTS,
    table=TABLE,
    network=network,
    dims_from_config=dims_from_config,
    example=EXAMPLE,
    evidence="dense: no layer has mlp.router.weight or mlp.experts",
)
