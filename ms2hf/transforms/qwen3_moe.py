"""Qwen3-MoE: the dense Qwen3 rules plus router and grouped experts (SPEC section 5).

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
from ms2hf.transforms import qwen3
from ms2hf.transforms.pieces import OutputTensor, copy, transposed_window

Shapes = qwen3.Shapes

ROUTER = "mlp.router.weight"
W1 = "mlp.experts.weight1"
W2 = "mlp.experts.weight2"
EXPERT_KEYS = (ROUTER, W1, W2)
FI_ACCU = "mlp.router.fi_accu"
"""Per-expert token counts accumulated for load balancing during training: not a weight."""
SPARSITY_KEYS = ("decoder_sparse_step", "mlp_only_layers")


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
    return any(is_moe_layer(keys) for keys in qwen3.layer_keys(shapes).values())


def expert_sizes(i: int, keys: Mapping[str, str], shapes: Shapes) -> tuple[int, int, int]:
    """``(experts, hidden, expert ffn)`` of MoE layer ``i``, with its three tensors checked
    against each other."""
    qwen3.require(i, keys, list(EXPERT_KEYS))
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


def expert_outputs(
    prefix: str, w1: str, w2: str, e: int, hidden: int, ffn: int
) -> list[OutputTensor]:
    """Expert ``e``: ``gate[j, h] = w1[e*H + h, j]``, ``up[j, h] = w1[e*H + h, Fm + j]``,
    ``down[h, f] = w2[e*Fm + f, h]`` (gate and up are contiguous halves, never interleaved)."""
    rows1 = (e * hidden, (e + 1) * hidden)
    return [
        transposed_window(f"{prefix}gate_proj.weight", w1, rows1, (0, ffn)),
        transposed_window(f"{prefix}up_proj.weight", w1, rows1, (ffn, 2 * ffn)),
        transposed_window(f"{prefix}down_proj.weight", w2, (e * ffn, (e + 1) * ffn), (0, hidden)),
    ]


def mlp_outputs(
    i: int, keys: Mapping[str, str], shapes: Shapes, layout: qwen3.WeightLayout
) -> list[OutputTensor]:
    """Layer ``i``'s MLP: router and experts when the layer has them, else the dense MLP."""
    if not is_moe_layer(keys):
        return qwen3.dense_mlp_outputs(i, keys, shapes, layout)
    experts, hidden, ffn = expert_sizes(i, keys, shapes)
    p = f"model.layers.{i}.mlp."
    out = [copy(p + "gate.weight", keys[ROUTER], shapes[keys[ROUTER]])]
    for e in range(experts):
        out += expert_outputs(f"{p}experts.{e}.", keys[W1], keys[W2], e, hidden, ffn)
    return out


def sparse_layout(dense: frozenset[int], num_layers: int) -> tuple[int, tuple[int, ...]]:
    """``(decoder_sparse_step, mlp_only_layers)`` that make exactly ``dense`` the dense layers:
    the step alone when one explains them (as a training yaml would say it), else step 1 and
    the list."""
    for step in range(1, num_layers + 1):
        if dense_layers(step, (), num_layers) == dense:
            return step, ()
    return 1, tuple(sorted(dense))


def dense_layers(step: int, mlp_only: tuple[int, ...], num_layers: int) -> frozenset[int]:
    """Hugging Face's rule: layer i has experts iff it is not in ``mlp_only_layers`` and
    ``(i + 1) % decoder_sparse_step == 0``."""
    return frozenset(i for i in range(num_layers) if i in mlp_only or (i + 1) % step)


def infer_dims(shapes: Shapes) -> MoeDims:
    base = qwen3.infer_dims(shapes)
    layers = qwen3.layer_keys(shapes)
    sizes: dict[int, tuple[int, int, int]] = {
        i: expert_sizes(i, keys, shapes) for i, keys in layers.items() if is_moe_layer(keys)
    }
    if not sizes:
        raise ModelError("no layer has experts (mlp.router.weight, mlp.experts.weight1/2)")
    first = min(sizes)
    for i, s in sizes.items():
        if s[0] != sizes[first][0] or s[2] != sizes[first][2]:
            raise ModelError(
                f"layer {i} has {s[0]} experts of ffn size {s[2]}, layer {first} has "
                f"{sizes[first][0]} of {sizes[first][2]}; Qwen3-MoE has one size for all layers"
            )
        if s[1] != base.hidden_size:
            raise ModelError(
                f"decoder.layers.{i}.{ROUTER} has {s[1]} columns, but the hidden size is "
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


def _check_sparsity(dims: MoeDims, given: Mapping[str, tuple[Any, str]]) -> None:
    """Given ``decoder_sparse_step`` / ``mlp_only_layers`` must make the same layers dense as the
    checkpoint has; they are compared by meaning, since several pairs say the same thing."""
    named = {k: given[k] for k in SPARSITY_KEYS if k in given}
    if not named:
        return
    origins = " and ".join(f"{origin} = {value!r}" for value, origin in named.values())
    step = named.get("decoder_sparse_step", (1, ""))[0]
    only = named.get("mlp_only_layers", ((), ""))[0] or ()  # null means none, as in transformers
    if (
        not isinstance(step, int)
        or step < 1
        or not isinstance(only, (list, tuple))
        or not all(isinstance(i, int) for i in only)
    ):
        raise ModelError(f"{origins}: expected a positive step and a list of layer numbers")
    n = dims.num_hidden_layers
    claimed = dense_layers(step, tuple(only), n)
    actual = dense_layers(dims.decoder_sparse_step, dims.mlp_only_layers, n)
    if claimed != actual:
        raise ModelError(
            f"{origins} make layers {sorted(claimed)} dense, but the checkpoint has dense MLPs "
            f"({qwen3.FC1}) in layers {sorted(actual)} and experts in the others"
        )


def check_given(dims: MoeDims, given: Mapping[str, tuple[Any, str]]) -> None:
    """Sizes as for dense Qwen3, the dense/MoE layer pattern by meaning, and top-k against the
    expert count (the one routing value the weights bound but cannot tell)."""
    _check_sparsity(dims, given)
    qwen3.check_given(dims, {k: v for k, v in given.items() if k not in SPARSITY_KEYS}, DIM_SOURCES)
    if "num_experts_per_tok" in given:
        top_k, origin = given["num_experts_per_tok"]
        if not isinstance(top_k, int) or not 1 <= top_k <= dims.num_experts:
            raise ModelError(
                f"{origin} = {top_k!r}: the router has {dims.num_experts} experts "
                f"({DIM_SOURCES['num_experts']}), so num_experts_per_tok must be "
                f"1..{dims.num_experts}"
            )


def output_tensors(shapes: Shapes, dims: MoeDims, layout: qwen3.WeightLayout) -> list[OutputTensor]:
    """Every Hugging Face tensor of a Qwen3-MoE; the routers' ``fi_accu`` statistics are skipped."""
    skipped = frozenset(
        keys[FI_ACCU] for keys in qwen3.layer_keys(shapes).values() if FI_ACCU in keys
    )
    return qwen3.output_tensors(shapes, dims, layout, mlp_outputs, skipped)
