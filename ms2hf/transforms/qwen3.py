"""Qwen3 (dense): MindSpore Transformers names and layouts -> Hugging Face (SPEC section 4).

Every rule is a small function from shapes to ``OutputTensor`` values; nothing here touches
tensor bytes. The model's sizes are read off the shapes, so flags are only ever checked, never
needed; a flag that disagrees with the weights names the flag, the tensor and both values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ms2hf.errors import ModelError
from ms2hf.transforms.pieces import OutputTensor, copy, row_runs

Shapes = Mapping[str, tuple[int, ...]]

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

QKV = "self_attention.linear_qkv.weight"
Q_NORM = "self_attention.q_layernorm.weight"
O_PROJ = "self_attention.linear_proj.weight"
FC1 = "mlp.linear_fc1.weight"

# Per-layer tensors that are renamed only, in Hugging Face's module order.
ATTENTION_COPIES = {
    O_PROJ: "self_attn.o_proj.weight",
    Q_NORM: "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
DENSE_MLP_COPIES = {"mlp.linear_fc2.weight": "mlp.down_proj.weight"}
NORM_COPIES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
}


@dataclass(frozen=True)
class WeightLayout:
    """How fused weights are laid out; the training yaml's flags, with their defaults."""

    contiguous_qkv: bool = False
    """``use_contiguous_weight_layout_attention``: [q; k; v] instead of per-group blocks."""
    interleaved_fc1: bool = True
    """``use_interleaved_weight_layout_mlp``: gate and up rows alternate instead of halves."""


@dataclass(frozen=True)
class Dims:
    """The sizes of a Qwen3 model, read off its tensors."""

    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int | None
    """None when no layer has a dense MLP (an all-MoE model): the weights cannot tell it."""
    tie_word_embeddings: bool


def layer_keys(shapes: Shapes) -> dict[int, dict[str, str]]:
    """``{layer: {suffix: full name}}`` for every ``decoder.layers.i.*`` key."""
    layers: dict[int, dict[str, str]] = {}
    for name in shapes:
        m = _LAYER.match(name)
        if m is not None:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
    return dict(sorted(layers.items()))


def _need(shapes: Shapes, name: str) -> tuple[int, ...]:
    shape = shapes.get(name)
    if shape is None:
        raise ModelError(f"parameter {name!r} is missing; a Qwen3 checkpoint must have it")
    return shape


def _first_layer_key(layers: dict[int, dict[str, str]], suffix: str) -> str:
    for keys in layers.values():
        if suffix in keys:
            return keys[suffix]
    raise ModelError(f"no layer has a '{suffix}' parameter; is this a Qwen3 checkpoint?")


def infer_dims(shapes: Shapes) -> Dims:
    vocab, hidden = _need(shapes, EMBEDDING)
    layers = layer_keys(shapes)
    if not layers:
        raise ModelError("no 'decoder.layers.<i>.*' parameters found")
    if list(layers) != list(range(len(layers))):
        raise ModelError(
            f"decoder layers {list(layers)} are not numbered 0..{len(layers) - 1}; "
            "a pipeline stage's rank files are missing?"
        )
    qkv = _first_layer_key(layers, QKV)
    (head_dim,) = shapes[_first_layer_key(layers, Q_NORM)]
    o_proj = shapes[_first_layer_key(layers, O_PROJ)]
    if o_proj[1] % head_dim:
        raise ModelError(
            f"{_first_layer_key(layers, O_PROJ)} has {o_proj[1]} columns, not a multiple of "
            f"head_dim {head_dim} (the q_layernorm length)"
        )
    heads = o_proj[1] // head_dim
    qkv_rows = shapes[qkv][0]
    groups2 = qkv_rows // head_dim - heads
    if qkv_rows % head_dim or groups2 <= 0 or groups2 % 2 or heads % (groups2 // 2):
        raise ModelError(
            f"{qkv} has {qkv_rows} rows, which is not (heads + 2 * groups) * head_dim for "
            f"{heads} heads of head_dim {head_dim}"
        )
    dims = Dims(
        hidden_size=hidden,
        vocab_size=vocab,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        num_key_value_heads=groups2 // 2,
        head_dim=head_dim,
        intermediate_size=_intermediate_size(shapes, layers),
        tie_word_embeddings=OUTPUT_LAYER not in shapes,
    )
    return dims


def _intermediate_size(shapes: Shapes, layers: dict[int, dict[str, str]]) -> int | None:
    for keys in layers.values():
        if FC1 in keys:
            rows = shapes[keys[FC1]][0]
            if rows % 2:
                raise ModelError(f"{keys[FC1]} has {rows} rows; gate and up need an even count")
            return rows // 2
    return None


# Which tensor each size is read from, for messages about disagreeing flags.
DIM_SOURCES = {
    "hidden_size": f"{EMBEDDING} columns",
    "vocab_size": f"{EMBEDDING} rows",
    "num_hidden_layers": "the count of decoder.layers.<i>",
    "num_attention_heads": f"decoder.layers.0.{O_PROJ} columns / head_dim",
    "num_key_value_heads": f"decoder.layers.0.{QKV} rows",
    "head_dim": f"decoder.layers.0.{Q_NORM} length",
    "intermediate_size": f"decoder.layers.0.{FC1} rows / 2",
    "tie_word_embeddings": f"absence of {OUTPUT_LAYER}",
}


def check_given(dims: object, given: Mapping[str, tuple[Any, str]], sources: Mapping[str, str]) -> None:
    """Fail on the first given value (a flag or a yaml entry) that the shapes contradict."""
    for name, (value, origin) in given.items():
        actual = getattr(dims, name, None)
        if actual is None:  # a size the weights cannot tell: nothing to check against
            continue
        if isinstance(actual, bool):
            ok = bool(value) == actual
        else:
            ok = value == actual
        if not ok:
            raise ModelError(
                f"{origin} = {value!r} disagrees with the checkpoint: {sources.get(name, name)} "
                f"gives {name} = {actual!r}"
            )


def attention_outputs(
    i: int, keys: Mapping[str, str], shapes: Shapes, dims: Dims, layout: WeightLayout
) -> list[OutputTensor]:
    p = f"model.layers.{i}."
    qkv = keys[QKV]
    d, nh, ng = dims.head_dim, dims.num_attention_heads, dims.num_key_value_heads
    shape = shapes[qkv]
    if layout.contiguous_qkv:
        q_runs, k_runs, v_runs = [(0, nh * d)], [(nh * d, ng * d)], [(nh * d + ng * d, ng * d)]
    else:
        r = nh // ng
        group = (r + 2) * d
        q_runs = [(g * group, r * d) for g in range(ng)]
        k_runs = [(g * group + r * d, d) for g in range(ng)]
        v_runs = [(g * group + r * d + d, d) for g in range(ng)]
    out = [
        row_runs(p + "self_attn.q_proj.weight", qkv, shape, q_runs),
        row_runs(p + "self_attn.k_proj.weight", qkv, shape, k_runs),
        row_runs(p + "self_attn.v_proj.weight", qkv, shape, v_runs),
    ]
    out += [copy(p + hf, keys[ms], shapes[keys[ms]]) for ms, hf in ATTENTION_COPIES.items()]
    return out


def dense_mlp_outputs(i: int, keys: Mapping[str, str], shapes: Shapes, layout: WeightLayout) -> list[OutputTensor]:
    require(i, keys, [FC1, *DENSE_MLP_COPIES])
    p = f"model.layers.{i}."
    fc1 = keys[FC1]
    shape = shapes[fc1]
    f = shape[0] // 2
    if layout.interleaved_fc1:
        gate = row_runs(p + "mlp.gate_proj.weight", fc1, shape, [(0, f)], step=2)
        up = row_runs(p + "mlp.up_proj.weight", fc1, shape, [(1, f)], step=2)
    else:
        gate = row_runs(p + "mlp.gate_proj.weight", fc1, shape, [(0, f)])
        up = row_runs(p + "mlp.up_proj.weight", fc1, shape, [(f, f)])
    down = [copy(p + hf, keys[ms], shapes[keys[ms]]) for ms, hf in DENSE_MLP_COPIES.items()]
    return [gate, up, *down]


def norm_outputs(i: int, keys: Mapping[str, str], shapes: Shapes) -> list[OutputTensor]:
    p = f"model.layers.{i}."
    return [copy(p + hf, keys[ms], shapes[keys[ms]]) for ms, hf in NORM_COPIES.items()]


def require(i: int, keys: Mapping[str, str], suffixes: list[str]) -> None:
    missing = [s for s in suffixes if s not in keys]
    if missing:
        raise ModelError(
            f"layer {i} lacks {', '.join(f'decoder.layers.{i}.{s}' for s in missing)}"
        )


def check_unexpected(shapes: Shapes, used: set[str], skipped: frozenset[str]) -> None:
    unexpected = sorted(set(shapes) - used - skipped)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise ModelError(
            f"unexpected parameters for this model: {shown}. Qwen3 has no biases and no other "
            "weights; ms2hf will not drop them silently"
        )


def global_outputs_head(shapes: Shapes) -> list[OutputTensor]:
    return [copy("model.embed_tokens.weight", EMBEDDING, shapes[EMBEDDING])]


def global_outputs_tail(shapes: Shapes, dims: Dims) -> list[OutputTensor]:
    out = [copy("model.norm.weight", FINAL_NORM, _need(shapes, FINAL_NORM))]
    head = EMBEDDING if dims.tie_word_embeddings else OUTPUT_LAYER
    out.append(copy("lm_head.weight", head, shapes[head]))
    return out


MlpRule = Callable[[int, Mapping[str, str], Shapes, WeightLayout], list[OutputTensor]]
"""A layer's MLP tensors from its keys; the one part of a layer that differs between models."""


def output_tensors(
    shapes: Shapes,
    dims: Dims,
    layout: WeightLayout,
    mlp_outputs: MlpRule = dense_mlp_outputs,
    skipped: frozenset[str] = frozenset(),
) -> list[OutputTensor]:
    """Every Hugging Face tensor, in Hugging Face's module order; any parameter that is neither
    used nor in ``skipped`` is an error."""
    out = global_outputs_head(shapes)
    for i, keys in layer_keys(shapes).items():
        require(i, keys, [QKV, *ATTENTION_COPIES, *NORM_COPIES])
        out += attention_outputs(i, keys, shapes, dims, layout)
        out += mlp_outputs(i, keys, shapes, layout)
        out += norm_outputs(i, keys, shapes)
    out += global_outputs_tail(shapes, dims)
    check_unexpected(shapes, {t.source for t in out}, skipped)
    return out
