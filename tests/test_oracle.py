"""The test oracle (tests/oracle) is right: it reproduces every genuine fixture's ground truth
bit for bit, its bf16 cast is SPEC's formula, and it refuses what SPEC says is broken. Only then
can the property tests trust it as the expected side of a comparison."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ms2hf.generator import GeneratorConfig, generate
from tests.conftest import DATA, DENSE_FIXTURES, MOE_FIXTURES
from tests.oracle import legacy, qwen3
from tests.oracle.convert import hf_tensors, mismatches
from tests.oracle.files import read_metadata, read_tensors


@pytest.mark.parametrize("name", DENSE_FIXTURES + MOE_FIXTURES)
def test_oracle_reproduces_the_ground_truth(name: str) -> None:
    fixture = DATA / name
    truth = read_tensors(fixture / "ground_truth" / "hf_model.safetensors")
    assert mismatches(hf_tensors(fixture), truth) == []


def test_oracle_bf16_cast_is_the_spec_formula() -> None:
    """Every kind of fp32 value: exact ties (odd and even), the largest finite values that
    round to inf, subnormals, signed zeros, infinities, and random bit patterns."""
    rng = np.random.default_rng(0)
    patterns = [
        0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x7F7F7FFF, 0xFF7F8000,
        0x00000001, 0x00008000, 0x00018000, 0x80000000, 0x00000000, 0x7F800000, 0xFF800000,
    ]
    bits = np.concatenate(
        [np.array(patterns, np.uint32), rng.integers(0, 2**32, 100_000, dtype=np.uint32)]
    )
    values = bits.view(np.float32)
    nan = np.isnan(values)
    got = qwen3.cast(values, "bf16")
    assert got.dtype == ml_dtypes.bfloat16
    assert np.array_equal(got.view(np.uint16)[~nan], qwen3.bf16_bits(values)[~nan])
    assert np.isnan(got.astype(np.float32)[nan]).all()
    assert nan.any()


def test_tensor_maps_are_decoded_packed_or_unpacked() -> None:
    """SPEC section 2: repeated scalars are written unpacked, -1 as a 10-byte varint; packed
    must be accepted too."""
    minus_one = b"\xff" * 9 + b"\x01"
    unpacked = b"\x08\x00" + b"\x08" + minus_one  # dim: 0, dim: -1
    packed = b"\x0a" + bytes([1 + len(minus_one)]) + b"\x00" + minus_one
    for buf in (unpacked, packed):
        assert legacy._ints(legacy._message(buf), 1, signed=True) == [0, -1]


def _generated(tmp_path: Path, **settings: object) -> Path:
    run = GeneratorConfig(
        layers=2, hidden=16, heads=2, groups=1, head_dim=8, ffn=8, vocab=16, tp=2, dp=2, **settings
    )
    return generate(run, tmp_path / "training").root


def _rewrite(path: Path, change: dict[str, np.ndarray | None]) -> None:
    """Rewrite a (fp32) rank file with tensors replaced or (None) removed."""
    tensors = {k: v.copy() for k, v in read_tensors(path).items()}
    for name, value in change.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(path), read_metadata(path))


def test_oracle_reports_a_block_no_rank_saved(tmp_path: Path) -> None:
    root = _generated(tmp_path, remove_redundancy=True)
    name = "decoder.layers.1.self_attention.linear_proj.weight"
    holder = next(
        p for p in sorted((root / "checkpoint").glob("rank_*/*.safetensors"))
        if name in read_tensors(p)
    )
    _rewrite(holder, {name: None})
    with pytest.raises(legacy.OracleError, match=f"{name}: element .* should hold it"):
        legacy.reassemble(root)


def test_oracle_reports_replicas_that_disagree(tmp_path: Path) -> None:
    root = _generated(tmp_path)
    name = "decoder.final_layernorm.weight"
    path = next(iter(sorted((root / "checkpoint").glob("rank_3/*.safetensors"))))
    _rewrite(path, {name: read_tensors(path)[name] + np.float32(1)})
    with pytest.raises(legacy.OracleError, match=f"{name}: rank 3's copy disagrees"):
        legacy.reassemble(root)
    assert name in legacy.reassemble(root, check_replicas=False)


def test_oracle_refuses_parameters_no_rule_knows() -> None:
    params = legacy.reassemble(DATA / "tiny_fp32")
    params["decoder.layers.0.self_attention.linear_qkv.bias"] = np.zeros(4, np.float32)
    with pytest.raises(qwen3.OracleError, match="linear_qkv.bias"):
        qwen3.to_hf(params)
