"""The engine's workers are the parallelism: while a task writes, OpenBLAS (numpy's BLAS, used
by the LoRA merge's product) runs one thread, and its setting is put back afterwards
(ms2hf/pipeline/engine/blas.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import ms2hf
from ms2hf.pipeline.engine import assemble
from ms2hf.pipeline.engine.blas import Controls, one_blas_thread, openblas_controls
from tests.conftest import DATA_LORA

TINY_LORA = DATA_LORA / "tiny_lora_fp32_tp2pp2"


@pytest.fixture
def blas() -> Iterator[Controls]:
    """numpy's OpenBLAS at two threads for the test (on one core it would say nothing), its
    setting put back after."""
    controls = openblas_controls()
    assert controls is not None, "numpy's wheels on Linux bring OpenBLAS; it was not found"
    get, put = controls
    before = get()
    put(2)
    yield controls
    put(before)


def test_one_thread_inside_and_the_setting_put_back(blas: Controls) -> None:
    get, _ = blas
    with one_blas_thread():
        assert get() == 1
        with one_blas_thread():  # a second task of the same process
            assert get() == 1
        assert get() == 1  # the first is still running
    assert get() == 2


def test_a_lora_merge_runs_its_products_on_one_blas_thread(
    blas: Controls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    get, _ = blas
    seen: list[int] = []
    merge_rows = assemble.merge_rows

    def recording(*args: object) -> None:
        seen.append(get())
        merge_rows(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(assemble, "merge_rows", recording)
    ms2hf.convert(TINY_LORA, tmp_path / "out", workers=2, progress=False)
    assert seen and set(seen) == {1}
    assert get() == 2
