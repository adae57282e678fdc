"""config.json: sizes from the weights, the rest from a reference config, the training yaml or the
published defaults, each value's origin said; tokenizer files copied beside it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ms2hf import cli
from ms2hf.commands.convert import ConvertOptions, convert
from ms2hf.errors import ModelError, Ms2hfError
from ms2hf.io.tokenizer_files import TOKENIZER_FILES
from ms2hf.transforms import qwen3
from ms2hf.transforms.hf_config import build_config
from ms2hf.transforms.qwen3 import Dims
from tests.conftest import DATA

FIXTURE = DATA / "tiny_fp32"
TRUTH = json.loads((FIXTURE / "ground_truth" / "config.json").read_text())


def run(tmp_path: Path, **options: Any) -> tuple[dict[str, Any], dict[str, str]]:
    out = tmp_path / "hf"
    report = convert(FIXTURE, out, ConvertOptions(progress=False, **options))
    return json.loads((out / "config.json").read_text()), report.config_origins


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


def write_yaml(path: Path, model_config: str) -> Path:
    path.write_text(
        "model:\n  model_config:\n" + "".join(f"    {line}\n" for line in model_config.splitlines())
    )
    return path


def test_defaults_and_sizes(tmp_path: Path) -> None:
    config, origins = run(tmp_path)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert config[key] == TRUTH[key], key
        assert origins[key] == "weights", key
    # The values every published Qwen3 config.json states (Qwen3-0.6B ... Qwen3-32B).
    published = {
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "hidden_act": "silu",
        "attention_bias": False,
    }
    for key, value in published.items():
        assert config[key] == value, key
        assert origins[key] == "qwen3 default", key
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": config["rope_theta"]}
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    # The published token ids do not exist in a 512-token vocabulary: left unset, and said so.
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    assert "151643 >= vocab_size 512" in origins["bos_token_id"]


def test_defaults_token_ids_kept_when_the_vocabulary_has_them() -> None:
    dims = Dims(1024, 151936, 28, 16, 8, 128, 3072, True)
    values = build_config(qwen3.FAMILY, dims, "BF16", {})
    assert (values["bos_token_id"].value, values["eos_token_id"].value) == (151643, 151645)
    assert values["eos_token_id"].origin == "qwen3 default"


def test_reference_config_in_transformers_5_form(tmp_path: Path) -> None:
    reference = write_json(
        tmp_path / "config.json",
        {
            **TRUTH,
            "rms_norm_eps": 1e-5,
            "bos_token_id": 1,
            "eos_token_id": [2, 3],
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "transformers_version": "5.0.0",
            "dtype": "float32",
        },
    )
    config, origins = run(tmp_path, reference_config=reference)
    assert config["max_position_embeddings"] == TRUTH["max_position_embeddings"] == 256
    assert origins["max_position_embeddings"] == "reference config.json: max_position_embeddings"
    assert (config["rms_norm_eps"], config["bos_token_id"], config["eos_token_id"]) == (
        1e-5,
        1,
        [2, 3],
    )
    assert config["rope_theta"] == 500000.0
    assert origins["rope_theta"] == "reference config.json: rope_parameters.rope_theta"
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert (
        config["torch_dtype"] == config["dtype"] == "bfloat16"
    )  # --dtype decides, not the reference
    assert "transformers_version" not in config
    assert origins["hidden_size"] == "weights"


def test_reference_config_in_old_form_with_rope_scaling(tmp_path: Path) -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    reference = write_json(
        tmp_path / "ref.json", {**TRUTH, "rope_theta": 20000.0, "rope_scaling": yarn}
    )
    config, _ = run(tmp_path, reference_config=reference)
    assert config["rope_theta"] == 20000.0
    assert config["rope_scaling"] == yarn
    assert config["rope_parameters"] == {**yarn, "rope_theta": 20000.0}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("hidden_size", 256, "hidden_size = 128"),
        ("num_key_value_heads", 4, "num_key_value_heads = 2"),
        ("tie_word_embeddings", True, "tie_word_embeddings = False"),
    ],
)
def test_reference_sizes_must_agree_with_the_weights(
    tmp_path: Path, key: str, value: Any, expected: str
) -> None:
    reference = write_json(tmp_path / "ref.json", {**TRUTH, key: value})
    with pytest.raises(Ms2hfError, match=rf"ref\.json: {key} = {value!r}.*{expected}"):
        run(tmp_path, reference_config=reference)
    assert not (tmp_path / "hf").exists()


def test_reference_for_another_model_type(tmp_path: Path) -> None:
    reference = write_json(tmp_path / "ref.json", {**TRUTH, "model_type": "qwen3_moe"})
    with pytest.raises(
        Ms2hfError,
        match=r"reference ref.json describes another model \(model_type = 'qwen3_moe'\), but "
        "the checkpoint is qwen3",
    ):
        run(tmp_path, reference_config=reference)


def test_yaml_values_and_yaml_exponent_strings(tmp_path: Path) -> None:
    # PyYAML reads 1e-5 (no dot) as a string; it is still a number to ms2hf.
    yaml = write_yaml(
        tmp_path / "train.yaml", "hidden_size: 128\nlayernorm_epsilon: 1e-5\nrope_theta: 10000.0"
    )
    config, origins = run(tmp_path, config=yaml)
    assert config["rms_norm_eps"] == 1e-5
    assert origins["rms_norm_eps"] == "train.yaml: model.model_config.layernorm_epsilon"
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 10000.0


def test_yaml_and_reference_must_agree(tmp_path: Path) -> None:
    yaml = write_yaml(tmp_path / "train.yaml", "rms_norm_eps: 1.0e-5\nmax_position_embeddings: 256")
    agreeing = write_json(tmp_path / "ok.json", {**TRUTH, "rms_norm_eps": 1e-5})
    config, origins = run(tmp_path, config=yaml, reference_config=agreeing)
    assert config["rms_norm_eps"] == 1e-5
    assert origins["rms_norm_eps"].startswith("train.yaml")
    disagreeing = write_json(tmp_path / "bad.json", TRUTH)
    with pytest.raises(
        Ms2hfError,
        match=r"bad\.json: rms_norm_eps = 1e-06 and train\.yaml: "
        r"model\.model_config\.rms_norm_eps = 1e-05 disagree",
    ):
        run(tmp_path / "second", config=yaml, reference_config=disagreeing)


def test_the_run_logs_where_each_value_came_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = write_json(tmp_path / "ref.json", {**TRUTH, "rms_norm_eps": 1e-5})
    with caplog.at_level(logging.INFO, logger="ms2hf"):
        run(tmp_path, reference_config=reference)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    by_origin = {line.split(": ", 1)[0].strip(): line for line in lines if line.startswith("  ")}
    assert "hidden_size=128" in by_origin["weights"]
    assert "rope_theta=1000000.0" in by_origin["qwen3 default"]
    assert "rms_norm_eps=1e-05" in by_origin["reference ref.json"]
    assert "max_position_embeddings=256" in by_origin["reference ref.json"]


def make_tokenizer_dir(folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    files = {
        name: f"{name} contents".encode()
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
        )
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "config.json").write_text("{}")  # never copied: the run writes its own
    (folder / "model.safetensors").write_bytes(b"not copied")
    return files


def test_tokenizer_files_are_copied(tmp_path: Path) -> None:
    files = make_tokenizer_dir(tmp_path / "tok")
    out = tmp_path / "hf"
    assert (
        cli.main(
            ["convert", str(FIXTURE), str(out), "--tokenizer-dir", str(tmp_path / "tok"), "-q"]
        )
        == 0
    )
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        *files,
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    }
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def test_tokenizer_dir_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no tokenizer here")
    for folder, message in (
        (empty, "holds none of tokenizer.json"),
        (tmp_path / "missing", "not a folder"),
    ):
        with pytest.raises(Ms2hfError, match=message):
            run(tmp_path, tokenizer_dir=folder)
        assert not (tmp_path / "hf").exists()
    assert "tokenizer.json" in TOKENIZER_FILES and "config.json" not in TOKENIZER_FILES


def test_tokenizer_files_replace_only_with_overwrite(tmp_path: Path) -> None:
    files = make_tokenizer_dir(tmp_path / "tok")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer.json").write_bytes(b"the user's own")
    with pytest.raises(Ms2hfError, match="--overwrite"):
        run(tmp_path, tokenizer_dir=tmp_path / "tok")
    assert (out / "tokenizer.json").read_bytes() == b"the user's own"
    run(tmp_path, tokenizer_dir=tmp_path / "tok", overwrite=True)
    assert (out / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    assert not list(out.glob(".*partial*"))


def test_reference_max_window_layers_is_kept(tmp_path: Path) -> None:
    """Published configs may state max_window_layers apart from the layer count; it is taken."""
    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps({"max_window_layers": 28}))
    out = tmp_path / "hf"
    convert(DATA / "tiny_fp32", out, ConvertOptions(progress=False, reference_config=reference))
    assert json.loads((out / "config.json").read_text())["max_window_layers"] == 28


def test_reference_num_local_experts_is_checked_against_the_weights(tmp_path: Path) -> None:
    """transformers 5 spells the expert count num_local_experts; a wrong one must not pass."""
    reference = tmp_path / "ref.json"
    reference.write_text(json.dumps({"model_type": "qwen3_moe", "num_local_experts": 16}))
    with pytest.raises(ModelError, match=r"num_local_experts.*16"):
        convert(
            DATA / "moe_fp32_dp2tp2pp2_ep2",
            tmp_path / "hf",
            ConvertOptions(progress=False, reference_config=reference),
        )
