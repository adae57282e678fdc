"""Hugging Face tensors fused into MindSpore Transformers parameters: the forward direction.

This is what mindformers' own weight conversion does before training (Hugging Face -> MCore),
written here from ``docs/qwen3.md`` and ``docs/qwen3-moe.md`` on its own, without the
converter's rules: the generator must not cut its checkpoints with the code it is meant to test
(a swapped K and V would otherwise survive every round trip). The converter's tables supply only
names (which Hugging Face tensors a parameter is made of); how they are laid out is decided here,
and the genuine fixtures check it byte for byte (``tests/test_generator.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ms2hf.errors import Ms2hfError
from ms2hf.transforms.mappings import (
    EXPERT,
    GateUpSplit,
    GroupedExperts,
    QkvSplit,
    Rename,
    Row,
    TiedHead,
    WeightLayout,
    in_layer,
)


def target_names(row: Row, layer: str, dims: Any) -> list[str]:
    """The Hugging Face tensors a parameter is made of, by name (a grouped-experts row: every
    expert's, expert by expert)."""
    names = [in_layer(t, layer) for t in row.targets()]
    if isinstance(row, GroupedExperts):
        return [n.replace(EXPERT, str(e)) for e in range(dims.num_experts) for n in names]
    return names


def _qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, dims: Any, contiguous: bool) -> np.ndarray:
    """``[q; k; v]``, or per query group its ``nh / ng`` query heads, one key head and one value
    head."""
    if contiguous:
        return np.concatenate([q, k, v])
    groups, d = dims.num_key_value_heads, dims.head_dim
    per = q.shape[0] // groups
    parts = []
    for g in range(groups):
        parts += [q[g * per : (g + 1) * per], k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    return np.concatenate(parts)


def _gate_up(gate: np.ndarray, up: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rows alternating gate, up, gate, up... or the two halves."""
    if not interleaved:
        return np.concatenate([gate, up])
    out = np.empty((2 * gate.shape[0], *gate.shape[1:]), gate.dtype)
    out[0::2], out[1::2] = gate, up
    return out


def _experts(tensors: list[np.ndarray], per_expert: int) -> np.ndarray:
    """Grouped experts, stored transposed: ``weight1`` row block e is ``[gate_e.T | up_e.T]``,
    ``weight2`` row block e is ``down_e.T``."""
    blocks = [
        np.concatenate([t.T for t in tensors[e : e + per_expert]], axis=1)
        for e in range(0, len(tensors), per_expert)
    ]
    return np.concatenate(blocks)


def fuse(
    row: Row, layer: str, values: Mapping[str, np.ndarray], dims: Any, layout: WeightLayout
) -> np.ndarray:
    """The MindSpore parameter of ``row`` (in ``layer``) made of its Hugging Face tensors."""
    names = target_names(row, layer, dims)
    tensors = [values[n] for n in names]
    if isinstance(row, (Rename, TiedHead)):
        return tensors[0]
    if isinstance(row, QkvSplit):
        q, k, v = tensors
        return _qkv(q, k, v, dims, layout.contiguous_qkv)
    if isinstance(row, GateUpSplit):
        gate, up = tensors
        return _gate_up(gate, up, layout.interleaved_fc1)
    if isinstance(row, GroupedExperts):
        return _experts(tensors, len(row.targets()))
    raise Ms2hfError(f"{row.source}: the generator cannot make a {type(row).__name__} parameter")
