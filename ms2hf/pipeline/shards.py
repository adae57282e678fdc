"""Packing output tensors into files, as huggingface_hub does: greedily, in key order, with a
tensor larger than the limit getting a file of its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

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


def hf_shard_names(count: int) -> list[str]:
    """``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
