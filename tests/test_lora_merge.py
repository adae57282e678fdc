"""The LoRA merge arithmetic (ms2hf/transforms/lora_merge.py) against the rule as the oracle
writes it (tests/oracle/lora.py: float64, k ascending, one rounding): equal bit for bit on every
stored dtype, on values that cancel, on signed zeros, NaN and inf, and whatever order the matrix
product sums in (its certificate, not BLAS's order, is what makes it exact); and the engine's
bands and column windows, however small the buffer, give the same bytes."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from ms2hf.io.dtypes import to_numpy
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.sources.legacy import plan_source
from ms2hf.pipeline.engine.assemble import _MergeLayout, assembled_bands, fit_row
from ms2hf.pipeline.lora import LoraRequest, lora_given
from ms2hf.pipeline.plan import plan_hf_checkpoint
from ms2hf.transforms.lora_merge import Work, merge_rows, prepare
from tests.conftest import DATA_LORA
from tests.oracle.lora import merge_weight

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def certified(w: np.ndarray, b: np.ndarray, a: np.ndarray, scale: float) -> np.ndarray:
    out = np.empty(w.shape, np.float32)
    f64 = np.float64
    work = Work.allocate(w.shape[0], w.shape[1], a.shape[0])
    merge_rows(out, w.astype(f64), b.astype(f64), prepare(a.astype(f64), scale), work)
    return out


def adversarial(rng: np.random.Generator, rows: int, cols: int, rank: int) -> tuple[Any, ...]:
    """Terms of wildly different magnitudes and signs, and weights that cancel the change: the
    sums round differently in every order, and results crowd around zero, where float32
    boundaries are dense."""
    a = (rng.standard_normal((rank, cols)) * 2.0 ** rng.integers(-30, 4, (rank, cols))).astype(
        np.float32
    )
    b = (rng.standard_normal((rows, rank)) * 2.0 ** rng.integers(-30, 4, (rows, rank))).astype(
        np.float32
    )
    scale = float(rng.choice([2.0, 16 / 6, 7 / 8, 0.1]))
    change = scale * (b.astype(np.float64) @ a.astype(np.float64))
    w = (-change * (1 + rng.standard_normal(change.shape) * 2.0**-20)).astype(np.float32)
    return w, b, a, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("seed", range(4))
def test_equals_the_rule_on_random_bands(dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        rows, cols, rank = (int(x) for x in rng.integers(1, [40, 70, 20]))
        w = (rng.standard_normal((rows, cols)) * rng.choice([1e-3, 1.0, 30.0])).astype(dtype)
        a = (rng.standard_normal((rank, cols)) * rng.choice([1e-2, 1.0])).astype(dtype)
        b = (rng.standard_normal((rows, rank)) * rng.choice([1e-2, 1.0, 100.0])).astype(dtype)
        scale = float(rng.choice([2.0, 16 / 6, 1.25, 0.1]))
        want = merge_weight(w, b, a, scale)
        assert certified(w, b, a, scale).tobytes() == want.tobytes()


def test_equals_the_rule_where_the_change_cancels_the_weight() -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):
        w, b, a, scale = adversarial(rng, 24, 40, 12)
        assert certified(w, b, a, scale).tobytes() == merge_weight(w, b, a, scale).tobytes()


def reversed_matmul(x: np.ndarray, y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A matrix product summing k from the top down: a legal BLAS, not the rule's order."""
    acc = x[:, -1:] * y[-1:, :]
    for k in range(x.shape[1] - 2, -1, -1):
        acc = acc + x[:, k : k + 1] * y[k : k + 1, :]
    if out is None:
        return acc
    out[...] = acc
    return out


def test_exact_whatever_order_the_product_sums_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a product that sums in reverse, merging it naively differs from the rule on these
    values; the certified merge does not (its uncertain elements go to the fixed order)."""
    rng = np.random.default_rng(11)
    cases = [adversarial(rng, 32, 48, 16) for _ in range(20)]
    monkeypatch.setattr(np, "matmul", reversed_matmul)
    naive_differs = 0
    for w, b, a, scale in cases:
        want = merge_weight(w, b, a, scale)
        naive = (w + np.matmul(b.astype(np.float64), a.astype(np.float64) * scale)).astype(
            np.float32
        )
        naive_differs += int(np.count_nonzero(naive != want))
        assert certified(w, b, a, scale).tobytes() == want.tobytes()
    assert naive_differs > 0


def test_signed_zeros_follow_the_rule() -> None:
    """The rule's sum of products that are all -0.0 is -0.0 (-0.0 + -0.0); a product summed
    from +0.0, as BLAS does, is +0.0. Bounds cannot tell the two zeros apart, so every zero
    result is recomputed in the fixed order."""
    w = np.array([[-0.0, 0.0, -0.0, 1.0]], np.float32)
    a = np.array([[-1.0, 1.0, 0.5, 1.0], [1.0, -1.0, -0.5, 1.0]], np.float32)
    b = np.array([[0.0, -0.0]], np.float32)
    for scale in (2.0, 0.5):
        got, want = certified(w, b, a, scale), merge_weight(w, b, a, scale)
        assert got.tobytes() == want.tobytes()
    assert np.signbit(want[0, 0]) and not np.signbit(want[0, 1]) and not np.signbit(want[0, 2])


def test_nan_and_inf_follow_the_rule() -> None:
    w = np.array([[np.inf, 1.0, 2.0, -np.inf, 3.0]], np.float32)
    a = np.array([[1.0, np.nan, 1.0, 2.0, 1.0], [1.0, 1.0, np.inf, 1.0, 1.0]], np.float32)
    b = np.array([[0.5, -0.25]], np.float32)
    for scale in (2.0, 0.5):
        with np.errstate(invalid="ignore"):  # inf - inf in the oracle's own sum
            got, want = certified(w, b, a, scale), merge_weight(w, b, a, scale)
        assert got.tobytes() == want.tobytes()  # NaN payloads and infinities included


@pytest.mark.parametrize("budget", [64 << 10, 20 << 10], ids=["chunks", "windows"])
def test_bands_chunks_and_column_windows_give_the_same_bytes(budget: int) -> None:
    """A smaller buffer cuts a fine-tuned weight into smaller output bands, merged a chunk of
    rows at a time and, once a row of float64 work no longer fits, a window of columns at a
    time: the bytes do not change, and everything stays inside the buffer."""
    fixture = DATA_LORA / "tiny_lora_fp32_tp2pp2"
    source = plan_source(fixture / "checkpoint", fixture / "strategy")
    request = LoraRequest(given=lora_given(16, None, None))
    plan = plan_hf_checkpoint(source, {}, "bf16", 10**9, lora_request=request)
    merged = [t.tensor for f in plan.files for t in f.tensors if t.tensor.delta is not None]
    assert len(merged) == 28
    dtype = to_numpy("BF16")
    with MappedFiles() as files:
        for tensor in merged[:7]:  # layer 0: every kind of module
            whole = np.empty(8 << 20, np.uint8)
            want = b"".join(
                bytes(raw)
                for _, _, raw in assembled_bands(tensor, dtype, whole, source.params, files)
            )
            small = np.empty(budget, np.uint8)
            assert fit_row(small, tensor, dtype) is small
            layout = _MergeLayout.of(tensor, dtype, budget)
            band, chunk = layout.rows(budget)
            assert (layout.width < tensor.row_elements) == (budget == 20 << 10)
            assert chunk < band and layout.bytes(band, chunk) <= budget
            got = [
                bytes(raw)
                for _, _, raw in assembled_bands(tensor, dtype, small, source.params, files)
            ]
            assert b"".join(got) == want, tensor.name
            assert len(got) == -(-tensor.rows // band)
