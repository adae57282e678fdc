"""``ms2hf demo`` runs end to end and its check catches a wrong byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from ms2hf.cli import main
from ms2hf.commands.demo import mismatches
from ms2hf.io.safetensors_reader import SafetensorsHeader


def test_demo_converts_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", str(tmp_path), "-q"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("demo: ") and line.endswith("tensors match the expected bytes"), line
    assert (tmp_path / "training_output" / "strategy" / "ckpt_strategy_rank_7.ckpt").is_file()
    # A second run replaces its own files instead of refusing the folder.
    assert main(["demo", str(tmp_path), "-q", "--dtype", "fp16"]) == 0


def test_mismatch_names_the_tensor(tmp_path: Path) -> None:
    assert main(["demo", str(tmp_path), "-q"]) == 0
    hf, expected = (
        tmp_path / "hf",
        tmp_path / "training_output" / "expected" / "hf_model.safetensors",
    )
    (shard,) = hf.glob("*.safetensors")
    info = SafetensorsHeader(shard).tensors["model.layers.1.mlp.down_proj.weight"]
    data = bytearray(shard.read_bytes())
    data[info.start + 5] ^= 0x01
    shard.write_bytes(bytes(data))
    assert mismatches(hf, expected, "bf16") == ["model.layers.1.mlp.down_proj.weight"]
    assert len(mismatches(hf, expected, "fp32")) == len(SafetensorsHeader(expected).tensors)


def test_moe_demo_converts_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", str(tmp_path), "-q", "--model", "qwen3-moe"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("demo: Qwen3-MoE (") and " x EP4 " in line, line
    assert line.endswith("tensors match the expected bytes"), line
    expected = SafetensorsHeader(tmp_path / "training_output" / "expected" / "hf_model.safetensors")
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in expected.tensors
    assert "model.layers.0.mlp.down_proj.weight" in expected.tensors  # the dense layer


def test_checkpoint2_demo_beside_the_legacy_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", str(tmp_path), "-q", "--format", "ckpt2"]) == 0
    line = capsys.readouterr().out.strip()
    assert " 16 Checkpoint 2.0 files " in line and line.endswith("match the expected bytes"), line
    iteration = tmp_path / "training_output" / "checkpoint" / "iteration_00001000"
    assert (iteration / "metadata.json").is_file()
    # Both formats in one training output: each run converts the save it made.
    assert main(["demo", str(tmp_path), "-q", "--model", "qwen3-moe"]) == 0
    assert main(["demo", str(tmp_path), "-q", "--format", "ckpt2", "--model", "qwen3-moe"]) == 0
    assert capsys.readouterr().out.count("match the expected bytes") == 2
