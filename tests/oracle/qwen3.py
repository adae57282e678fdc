"""Hugging Face tensors from full MindSpore Transformers tensors (SPEC sections 4-6), in numpy.

Why it is written this way: ms2hf describes each output tensor as pieces (row runs, strides,
transposed windows) that its executor assembles; a mistake in a piece would be repeated by the
generator, which scatters through the same pieces. Here every rule is the SPEC's own sentence as
numpy slicing on whole arrays (the QKV split as the view ``[ng, (r+2)*d, H]``, gate/up as
``fc1[0::2]`` / ``fc1[1::2]``, an expert as a transposed block), so the two are written twice
and independently. The sizes are read off the shapes, as SPEC section 4 says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import ml_dtypes
import numpy as np

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Per-layer parameters that are renamed only (SPEC section 4 table, plus the MoE router).
COPIES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
}
SKIPPED = {"mlp.router.fi_accu"}
"""A load-balancing statistic of training, not a weight (SPEC section 5)."""


class OracleError(Exception):
    """A parameter the rules do not know, or shapes that do not fit them."""


def _layers(params: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, a in params.items():
        m = _LAYER.match(name)
        if m is not None:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = a
    return layers


def split_qkv(
    qkv: np.ndarray, heads: int, groups: int, head_dim: int, contiguous: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``linear_qkv`` -> q, k, v. Grouped (default): view as ``[ng, (r+2)*d, H]``; in each
    group rows ``[0, r*d)`` are q, the next ``d`` k, the last ``d`` v. Contiguous: ``[q; k; v]``."""
    d, ng, nh = head_dim, groups, heads
    hidden = qkv.shape[1]
    if contiguous:
        q = qkv[: nh * d]
        k = qkv[nh * d : nh * d + ng * d]
        v = qkv[nh * d + ng * d :]
        return q, k, v
    r = nh // ng
    view = qkv.reshape(ng, (r + 2) * d, hidden)
    q = view[:, : r * d].reshape(nh * d, hidden)
    k = view[:, r * d : r * d + d].reshape(ng * d, hidden)
    v = view[:, r * d + d :].reshape(ng * d, hidden)
    return q, k, v


def split_fc1(fc1: np.ndarray, interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    """``linear_fc1`` -> gate, up: rows alternate (default, row 2j gate j, row 2j+1 up j) or
    are ``[gate; up]`` halves."""
    if interleaved:
        return fc1[0::2], fc1[1::2]
    f = fc1.shape[0] // 2
    return fc1[:f], fc1[f:]


def split_experts(
    w1: np.ndarray, w2: np.ndarray, experts: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Grouped experts -> (gate, up, down) of each expert: ``gate_e[j, h] = w1[e*H + h, j]``,
    ``up_e[j, h] = w1[e*H + h, Fm + j]``, ``down_e[h, f] = w2[e*Fm + f, h]``."""
    hidden = w1.shape[0] // experts
    fm = w1.shape[1] // 2
    out = []
    for e in range(experts):
        rows = w1[e * hidden : (e + 1) * hidden]  # [H, 2*Fm]
        out.append((rows[:, :fm].T, rows[:, fm:].T, w2[e * fm : (e + 1) * fm].T))
    return out


def to_hf(
    params: Mapping[str, np.ndarray],
    *,
    contiguous_qkv: bool = False,
    interleaved_fc1: bool = True,
) -> dict[str, np.ndarray]:
    """Every Hugging Face tensor of a Qwen3 or Qwen3-MoE model, in the parameters' dtype.

    A layer is dense when it has ``mlp.linear_fc1``, MoE when it has a router and experts;
    ``fi_accu`` is skipped; any other parameter is an error, not silently dropped."""
    layers = _layers(params)
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": params[EMBEDDING]}
    used = {EMBEDDING}
    for i, keys in sorted(layers.items()):
        pm, ph = f"decoder.layers.{i}.", f"model.layers.{i}."
        (head_dim,) = keys["self_attention.q_layernorm.weight"].shape
        heads = keys["self_attention.linear_proj.weight"].shape[1] // head_dim
        qkv = keys["self_attention.linear_qkv.weight"]
        groups = (qkv.shape[0] // head_dim - heads) // 2
        q, k, v = split_qkv(qkv, heads, groups, head_dim, contiguous_qkv)
        out[ph + "self_attn.q_proj.weight"] = q
        out[ph + "self_attn.k_proj.weight"] = k
        out[ph + "self_attn.v_proj.weight"] = v
        used.add(pm + "self_attention.linear_qkv.weight")
        if "mlp.linear_fc1.weight" in keys:
            gate, up = split_fc1(keys["mlp.linear_fc1.weight"], interleaved_fc1)
            out[ph + "mlp.gate_proj.weight"] = gate
            out[ph + "mlp.up_proj.weight"] = up
            used.add(pm + "mlp.linear_fc1.weight")
        if "mlp.experts.weight1" in keys:
            experts = keys["mlp.router.weight"].shape[0]
            split = split_experts(keys["mlp.experts.weight1"], keys["mlp.experts.weight2"], experts)
            for e, (gate, up, down) in enumerate(split):
                out[f"{ph}mlp.experts.{e}.gate_proj.weight"] = gate
                out[f"{ph}mlp.experts.{e}.up_proj.weight"] = up
                out[f"{ph}mlp.experts.{e}.down_proj.weight"] = down
            used.update(pm + s for s in ("mlp.experts.weight1", "mlp.experts.weight2"))
        for ms, hf in COPIES.items():
            if ms in keys:
                out[ph + hf] = keys[ms]
                used.add(pm + ms)
        used.update(pm + s for s in SKIPPED if s in keys)
    out["model.norm.weight"] = params[FINAL_NORM]
    out["lm_head.weight"] = params.get(OUTPUT_LAYER, params[EMBEDDING])  # tied: the embedding
    used.update({FINAL_NORM, OUTPUT_LAYER} & set(params))
    unknown = sorted(set(params) - used)
    if unknown:
        raise OracleError(f"parameters no rule uses: {unknown}")
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


TARGETS: dict[str, np.dtype] = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
}


def cast(a: np.ndarray, target: str) -> np.ndarray:
    """SPEC section 6: ``source`` keeps the stored dtype; otherwise widen to fp32 (exact from
    bf16 and fp16), then one round to nearest even into the target (ml_dtypes for bf16, numpy
    for fp16, overflow to inf)."""
    if target == "source":
        return a
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(np.float32).astype(TARGETS[target])


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """SPEC section 6's bit formula for fp32 -> bf16 as uint16 bit patterns: a second account
    of the ml_dtypes cast that :func:`cast` uses, checked against it in the tests. The formula
    is for non-NaN values; a NaN is kept a NaN (a quiet one, sign kept), payload aside."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # quiet NaN, sign kept
    return rounded
