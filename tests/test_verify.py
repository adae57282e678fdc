"""``ms2hf verify``: a good folder passes; a flipped byte, a missing shard, a wrong index, shapes
that disagree with config.json or with the training output are each reported, and the exit
status says so."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ms2hf.cli import main
from tests.conftest import DATA, DENSE_FIXTURES, MOE_FIXTURES
from tests.edit_checkpoint import edit_header

INDEX = "model.safetensors.index.json"


def verify(capsys: pytest.CaptureFixture[str], folder: Path, *extra: object) -> tuple[int, str]:
    code = main(["verify", str(folder), *map(str, extra)])
    return code, capsys.readouterr().out


@pytest.fixture
def hf(tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    assert (
        main(["convert", str(DATA / "tiny_fp32"), str(out), "-q", "--max-shard-size", "300KB"]) == 0
    )
    return out


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [*((n, "bf16") for n in [*DENSE_FIXTURES, *MOE_FIXTURES]), ("tiny_bf16_dedup", "source")],
)
def test_a_conversion_verifies_against_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, dtype: str
) -> None:
    out = tmp_path / "hf"
    assert main(["convert", str(DATA / name), str(out), "-q", "--dtype", dtype]) == 0
    code, text = verify(capsys, out, "--against", DATA / name, "--workers", "2")
    assert code == 0, text
    assert text.startswith(f"{out}: OK (1 file(s), ") and "bytes against" in text


def test_a_flipped_byte_is_caught_by_the_source_and_by_the_run_record(
    hf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = hf / "model-00002-of-00005.safetensors"
    _flip_last_byte(shard)
    code, text = verify(capsys, hf)
    assert code == 1
    assert f"{shard.name}: bytes differ from what ms2hf wrote ({INDEX})" in text
    index = json.loads((hf / INDEX).read_text())
    del index["metadata"]["ms2hf"]  # a folder whose index lost ms2hf's digests
    (hf / INDEX).write_text(json.dumps(index))
    assert verify(capsys, hf)[0] == 0
    code, text = verify(capsys, hf, "--against", DATA / "tiny_fp32")
    assert code == 1 and "1 problem(s)" in text
    assert f"{shard.name}: " in text and "differs from the source (first at row" in text


def test_a_missing_shard_is_caught(hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (hf / "model-00003-of-00005.safetensors").unlink()
    code, text = verify(capsys, hf)
    assert code == 1
    assert "model-00003-of-00005.safetensors: named by the index but missing" in text
    assert "total_size is 1248000, the tensors hold" in text
    assert "config.json implies it, the folder lacks it" in text


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_index_problems_are_each_reported(hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def damage(index: dict[str, Any]) -> None:
        index["metadata"]["total_size"] += 2
        index["weight_map"]["model.norm.weight"] = "model-00001-of-00005.safetensors"
        del index["weight_map"]["model.layers.0.input_layernorm.weight"]

    _edit_json(hf / INDEX, damage)
    (hf / "model-00009-of-00009.safetensors").write_bytes(
        (hf / "model-00001-of-00005.safetensors").read_bytes()
    )
    code, text = verify(capsys, hf)
    assert code == 1
    assert "total_size is 1248002, the tensors hold 1248000 bytes" in text
    assert (
        "holds model.norm.weight, which the index places in model-00001-of-00005.safetensors"
        in text
    )
    assert "holds model.layers.0.input_layernorm.weight, which the index does not list" in text
    assert "model-00009-of-00009.safetensors: a shard the index does not name" in text


def test_a_corrupt_header_is_reported_with_the_rest(
    hf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = hf / "model-00004-of-00005.safetensors"
    edit_header(shard, lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype="F99"))
    code, text = verify(capsys, hf)
    assert code == 1 and f"{shard}: tensor" in text and "unknown dtype 'F99'" in text


def test_shapes_are_checked_against_config_json(
    hf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_json(hf / "config.json", lambda c: c.update(num_key_value_heads=4, num_hidden_layers=5))
    code, text = verify(capsys, hf)
    assert code == 1
    assert (
        "model.layers.0.self_attn.k_proj.weight has shape [64, 128], config.json implies [128, 128]"
        in text
    )
    assert (
        "model.layers.4.input_layernorm.weight: config.json implies it, the folder lacks it" in text
    )


def test_an_unknown_model_type_cannot_be_shape_checked(
    hf: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_json(hf / "config.json", lambda c: c.update(model_type="llama"))
    code, text = verify(capsys, hf)
    assert code == 1 and "model_type 'llama' has no shape rules" in text


def test_the_wrong_training_output_is_caught(hf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The fixtures share their values but for the tied one's head, which is its embedding."""
    code, text = verify(capsys, hf, "--against", DATA / "tiny_tied_fp32_tp2pp2")
    assert code == 1 and "1 problem(s)" in text
    assert "lm_head.weight differs from the source (first at row 0)" in text


def test_a_folder_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert f"ms2hf verify: error: {tmp_path / 'nowhere'}: not a folder" in capsys.readouterr().err
