"""Packing output tensors into files, as huggingface_hub does: greedily, in key order, with a
tensor larger than the limit getting a file of its own; or one file per decoder layer, as the
old reverse tool did, for users whose scripts expect those names."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

from ms2hf.io.hf_output import hf_shard_names

T = TypeVar("T")


def pack(items: Sequence[T], sizes: Sequence[int], max_bytes: int) -> list[list[T]]:
    groups: list[list[T]] = []
    current: list[T] = []
    used = 0
    for item, size in zip(items, sizes):
        if current and used + size > max_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    if current or not groups:
        groups.append(current)
    return groups


SHARD_LAYOUTS = ("size", "per-layer")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def per_layer(items: Sequence[T], names: Sequence[str]) -> list[tuple[str, list[T]]]:
    """The old reverse tool's files: ``model-{i+1:05d}-of-{L:05d}.safetensors`` holds layer i,
    and the last one also holds everything outside the layers (embedding, norm, head)."""
    layers: dict[int, list[T]] = {}
    rest: list[T] = []
    for item, name in zip(items, names):
        m = _HF_LAYER.match(name)
        if m is None:
            rest.append(item)
        else:
            layers.setdefault(int(m.group(1)), []).append(item)
    count = max(layers, default=0) + 1
    groups = [layers.get(i, []) for i in range(count)]
    groups[-1] += rest
    return [(f"model-{i + 1:05d}-of-{count:05d}.safetensors", g) for i, g in enumerate(groups)]


def assign_shards(
    items: Sequence[T], names: Sequence[str], sizes: Sequence[int], max_bytes: int, layout: str
) -> list[tuple[str, list[T]]]:
    """Output files and their contents: by size (huggingface_hub's packing) or per layer."""
    if layout not in SHARD_LAYOUTS:
        raise ValueError(f"unknown shard layout {layout!r}; expected one of {SHARD_LAYOUTS}")
    if layout == "per-layer":
        return per_layer(items, names)
    groups = pack(items, sizes, max_bytes)
    return list(zip(hf_shard_names(len(groups)), groups))
