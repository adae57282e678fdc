"""The hot write path kept cheap without giving anything up: the page-sum checksum is the same
however a tensor's bytes are cut into pieces and catches the damage it exists for; write-behind
starts every range and waits only for ranges older than its window; bands stay cache-sized, but
for a LoRA merge, whose buffer is larger, within the budget."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ms2hf
from ms2hf.io import writeback
from ms2hf.io.safetensors_writer import ShardWriter, TensorEntry, layout_shard
from ms2hf.io.shard_digest import PAGE_BYTES, TensorChecksum, checksum, file_digest
from ms2hf.pipeline.engine import execute
from ms2hf.pipeline.engine.budget import MAX_BAND_BYTES, MAX_MERGE_BYTES, MemoryBudget
from tests.conftest import DATA_LORA, examples


def _checksum(*pieces: bytes) -> int:
    c = TensorChecksum()
    for piece in pieces:
        c.update(piece)
    return c.value


def _data(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@settings(max_examples=examples(40), deadline=None)
@given(
    size=st.integers(0, 5 * PAGE_BYTES + 13),
    cuts=st.lists(st.integers(0, 5 * PAGE_BYTES + 13), max_size=6),
)
def test_checksum_does_not_depend_on_how_the_bytes_are_cut(size: int, cuts: list[int]) -> None:
    data = _data(size)
    bounds = [0, *sorted(min(c, size) for c in cuts), size]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert _checksum(*pieces) == _checksum(data)


@settings(max_examples=examples(40), deadline=None)
@given(size=st.integers(0, 4 * PAGE_BYTES + 13))
def test_checksum_of_whole_bytes_is_the_running_checksum(size: int) -> None:
    data = _data(size, seed=size)
    assert checksum(data) == _checksum(data)


def test_tensors_written_together_give_the_digest_read_back(tmp_path: Path) -> None:
    entries = [TensorEntry(f"t{i}", "F32", (i + 1, 3)) for i in range(5)]
    layout = layout_shard(entries, {"format": "pt"})
    data = {e.name: _data(e.nbytes, seed=i) for i, e in enumerate(layout.entries)}
    writer = ShardWriter(tmp_path / "m.safetensors", layout)
    first, rest = layout.entries[:2], layout.entries[2:]
    writer.write(first[0].name, 0, data[first[0].name])
    writer.write(first[1].name, 0, data[first[1].name])
    joined = np.frombuffer(b"".join(data[e.name] for e in rest), np.uint8)
    writer.write_run([e.name for e in rest], [e.nbytes for e in rest], joined)
    assert writer.commit() == file_digest(tmp_path / "m.safetensors")


@pytest.mark.parametrize("size", [8, PAGE_BYTES - 3, 3 * PAGE_BYTES, 3 * PAGE_BYTES + 5])
def test_checksum_catches_flipped_bits_moved_pages_zeroed_pages_and_truncation(size: int) -> None:
    data = bytearray(_data(size, seed=size))
    reference = _checksum(bytes(data))
    for at in (0, size // 2, size - 1):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        assert _checksum(bytes(flipped)) != reference
    assert _checksum(bytes(data[:-1])) != reference
    if size >= 2 * PAGE_BYTES:
        swapped = data[PAGE_BYTES : 2 * PAGE_BYTES] + data[:PAGE_BYTES] + data[2 * PAGE_BYTES :]
        assert _checksum(bytes(swapped)) != reference
        zeroed = data[:PAGE_BYTES] + bytes(PAGE_BYTES) + data[2 * PAGE_BYTES :]
        assert _checksum(bytes(zeroed)) != reference


def test_digest_while_writing_equals_digest_recomputed_from_the_file(tmp_path: Path) -> None:
    """Tensors of odd sizes written in uneven pieces: the committed digest is what a resumed
    run recomputes from disk."""
    arrays = {"a": _data(3 * PAGE_BYTES + 6, 1), "b": _data(10, 2), "c": _data(PAGE_BYTES, 3)}
    entries = [TensorEntry(n, "U8", (len(v),)) for n, v in arrays.items()]
    writer = ShardWriter(tmp_path / "x.safetensors", layout_shard(entries, {"format": "pt"}))
    for name, value in arrays.items():
        step = 1000 if name == "a" else len(value)
        for at in range(0, len(value), step):
            writer.write(name, at, value[at : at + step])
    assert writer.commit() == file_digest(tmp_path / "x.safetensors")


def test_write_behind_starts_whole_pages_and_waits_only_beyond_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def record(fd: int, position: int, nbytes: int, flags: int) -> None:
        with lock:
            calls.append((position, nbytes, flags))

    monkeypatch.setattr(writeback, "_sync_range", record)
    page = writeback.PAGE_BYTES
    behind = writeback.WriteBehind(fd=-1, window=2 * page)
    behind.written(0, page)
    behind.written(page + 10, 2 * page)  # starts and ends inside pages: only [2p, 3p) is whole
    behind.written(3 * page + 10, 50)  # no whole page
    behind.written(4 * page, page)  # three pages in flight: the oldest is waited for
    started = [(p, n) for p, n, f in calls if f == writeback._WRITE]
    waited = [(p, n) for p, n, f in calls if f & writeback._WAIT_AFTER]
    assert started == [(0, page), (2 * page, page), (4 * page, page)]
    assert waited == [(0, page)]


def test_bands_are_cache_sized_whatever_the_budget() -> None:
    assert MemoryBudget(2**40, 2).band_bytes == MAX_BAND_BYTES <= 4 * 2**20
    assert MemoryBudget(2 * 2**20, 2).band_bytes == 2**20  # a small budget still lowers them


def test_a_lora_merge_gets_a_larger_buffer_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MemoryBudget(2**40, 2).merge_bytes == MAX_MERGE_BYTES > MAX_BAND_BYTES
    assert MemoryBudget(8 * 2**20, 2).merge_bytes == 4 * 2**20  # each worker's share
    assert MemoryBudget(2 * 2**20, 2).merge_bytes == 2**20  # never below a band buffer
    sizes: dict[bool, set[int]] = {True: set(), False: set()}
    assembled_bands = execute.assembled_bands

    def recording(tensor, dtype, buffer, *rest):  # type: ignore[no-untyped-def]
        sizes[tensor.delta is not None].add(len(buffer))
        return assembled_bands(tensor, dtype, buffer, *rest)

    monkeypatch.setattr(execute, "assembled_bands", recording)
    fixture = DATA_LORA / "tiny_lora_fp32_tp2pp2"
    ms2hf.convert(fixture, tmp_path / "out", workers=2, memory_budget=2**30, progress=False)
    assert sizes[True] == {MAX_MERGE_BYTES}  # the fine-tuned tensors
    assert sizes[False] <= {MAX_BAND_BYTES}  # the others (this model's are small: written in runs)
