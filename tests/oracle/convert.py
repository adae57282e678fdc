"""The oracle end to end: a training output folder -> the Hugging Face tensors it must give.

Tests compare ms2hf's conversion (and the generator's expected tensors) with this, so that their
expected values come from code that shares nothing with ms2hf's layout math or rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tests.oracle import legacy, qwen3


def hf_tensors(
    root: str | Path,
    dtype: str = "source",
    *,
    contiguous_qkv: bool = False,
    interleaved_fc1: bool = True,
) -> dict[str, np.ndarray]:
    """Reassemble the training output in ``root``, split it into Hugging Face tensors and cast
    them to ``dtype`` (``bf16``, ``fp16``, ``fp32`` or ``source``). The two flags are the
    training yaml's ``use_contiguous_weight_layout_attention`` and
    ``use_interleaved_weight_layout_mlp``."""
    params = legacy.reassemble(root)
    hf = qwen3.to_hf(params, contiguous_qkv=contiguous_qkv, interleaved_fc1=interleaved_fc1)
    return {name: qwen3.cast(a, dtype) for name, a in hf.items()}


def mismatches(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> list[str]:
    """Names missing on either side, or whose dtype, shape or bytes differ: ``[]`` when equal."""
    bad = set(got) ^ set(want)
    for name in set(got) & set(want):
        g, w = got[name], want[name]
        if (g.dtype, g.shape) != (w.dtype, w.shape) or g.tobytes() != w.tobytes():
            bad.add(name)
    return sorted(bad)
