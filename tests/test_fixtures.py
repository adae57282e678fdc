"""Conformance: every dense genuine MindSpore fixture converts to its ground truth, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from ms2hf.commands.convert import ConvertOptions, convert
from tests.conftest import assert_matches_ground_truth, load_hf_dir


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "source"])
def test_fixture_matches_ground_truth(dense_fixture: Path, dtype: str, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    convert(dense_fixture, out, ConvertOptions(dtype=dtype, progress=False, workers=2))
    assert_matches_ground_truth(out, dense_fixture, dtype)


def test_output_loads_with_safetensors_and_index_is_complete(
    dense_fixture: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    convert(dense_fixture, out, ConvertOptions(progress=False, max_shard_size=300_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1
    assert shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    seen: list[str] = []
    total = 0
    for shard in shards:
        with safe_open(out / shard, framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
            seen += names
            assert all(weight_map[n] == shard for n in names)
    for arr in load_hf_dir(out).values():
        total += arr.nbytes
    assert sorted(seen) == sorted(weight_map)
    assert len(seen) == len(set(seen))
    assert index["metadata"]["total_size"] == total


def test_config_json_matches_fixture_config(dense_fixture: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    convert(dense_fixture, out, ConvertOptions(progress=False))
    config = json.loads((out / "config.json").read_text())
    truth = json.loads((dense_fixture / "ground_truth" / "config.json").read_text())
    for key in (
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert config[key] == truth[key], key
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
