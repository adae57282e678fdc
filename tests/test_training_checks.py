"""Checks that match the training run (issue 12, items 5 and 6): the yaml of another model
family is refused, every problem is reported in one run, MoE routing reaches config.json or
stops the run (or is folded into down_proj on request), token ids past the vocabulary never
reach config.json, a disagreement between yaml and reference config is settled with --set; and
the step converted when the newest one is incomplete is said, and inspect lists it.

The yamls and configs are tests/configs/'s stand-ins for the genuine mindformers files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml

from ms2hf.cli import main
from ms2hf.io.config_files import ConfigValue
from ms2hf.io.mapped import MappedFiles
from ms2hf.io.sources.legacy import find_rank_dirs, plan_source, select_step
from ms2hf.pipeline.engine.assemble import assembled_bands
from ms2hf.transforms.registry import hf_model
from tests.conftest import (
    CONFIGS,
    DATA,
    EXPECTED_DTYPE,
    MOE_FIXTURES,
    fails,
    fitting_tokens,
    load_hf_dir,
    load_tensors,
)
from tests.conftest import run_cli as run
from tests.edit_checkpoint import copy_fixture

TINY = DATA / "tiny_fp32"
MOE = DATA / MOE_FIXTURES[0]
DENSE_YAML = CONFIGS / "pretrain_qwen3_4k.yaml"
MOE_YAML = CONFIGS / "pretrain_qwen3_moe_4k.yaml"


def edited_yaml(source: Path, dest: Path, **changes: object) -> Path:
    doc = yaml.safe_load(source.read_text())
    for key, value in changes.items():
        if value is None:
            doc["model"]["model_config"].pop(key, None)
        else:
            doc["model"]["model_config"][key] = value
    dest.write_text(yaml.safe_dump(doc))
    return dest


# --- the family ------------------------------------------------------------------------------


def test_a_moe_yaml_on_a_dense_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, "convert", TINY, tmp_path / "hf", "--config", MOE_YAML)
    assert "pretrain_qwen3_moe_4k.yaml describes another model" in line
    assert "model_type = 'qwen3_moe'" in line and "num_experts = 8" in line
    assert "the checkpoint is qwen3" in line
    # Without its model_type, the experts alone give it away.
    bare = edited_yaml(MOE_YAML, tmp_path / "moe.yaml", model_type=None, architectures=None)
    line = fails(capsys, "convert", TINY, tmp_path / "hf", "--config", bare)
    assert "num_experts = 8" in line and "model_type" not in line
    assert not (tmp_path / "hf").exists()


def test_a_dense_yaml_on_a_moe_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, "convert", MOE, tmp_path / "hf", "--config", DENSE_YAML)
    assert "pretrain_qwen3_4k.yaml describes another model" in line
    assert "model_type = 'qwen3'" in line and "architectures = ['Qwen3ForCausalLM']" in line
    assert "the checkpoint is qwen3-moe" in line


# --- one run, every problem ------------------------------------------------------------------


def test_every_disagreement_is_reported_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = edited_yaml(
        DENSE_YAML, tmp_path / "train.yaml", hidden_size=256, num_hidden_layers=8, head_dim=64
    )
    reference = json.loads((CONFIGS / "qwen3_config.json").read_text())
    reference.update(vocab_size=1024, rms_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(reference))
    argv = ["convert", TINY, tmp_path / "hf", "--config", train, "--set", "intermediate_size=100"]
    line = fails(capsys, *argv, "--reference-config", tmp_path / "config.json")
    for expected in (
        "--set: intermediate_size = 100 disagrees with the checkpoint: decoder.layers.0.mlp."
        "linear_fc1.weight rows / 2 gives intermediate_size = 192",
        "reference config.json: hidden_size = 128 and train.yaml: model.model_config.hidden_size"
        " = 256 disagree; the weights give hidden_size = 128",
        "model.model_config.num_hidden_layers = 8 disagree; the weights give num_hidden_layers = 4",
        "model.model_config.head_dim = 64 disagree; the weights give head_dim = 32",
        "reference config.json: vocab_size = 1024 and train.yaml: model.model_config.vocab_size"
        " = 512 disagree; the weights give vocab_size = 512",
        "max_position_embeddings = 40960 and train.yaml: model.model_config."
        "max_position_embeddings = 4096 disagree; settle it with --set max_position_embeddings",
        "rms_norm_eps = 1e-05 and train.yaml: model.model_config.rms_norm_eps = 1e-06 disagree",
        "bos_token_id = 151643: no such token in this model (vocab_size 512",
    ):
        assert expected in line, expected


def test_token_ids_past_the_vocabulary_never_reach_config_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, "convert", TINY, tmp_path / "hf", "--config", DENSE_YAML)
    for key, value in (("bos", 151643), ("eos", 151645), ("pad", 151643)):
        assert f"model.model_config.{key}_token_id = {value}: no such token" in line
        assert f"--set {key}_token_id=null" in line
    argv = ["--set", "bos_token_id=null", "--set", "eos_token_id=3", "--set", "pad_token_id=None"]
    code, err = run(capsys, "convert", TINY, tmp_path / "hf", "--config", DENSE_YAML, *argv)
    assert code == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        None,
        3,
        None,
    )


def test_the_4k_yaml_and_the_published_config_settled_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = fitting_tokens("pretrain_qwen3_4k.yaml", tmp_path / "train.yaml")
    reference = fitting_tokens("qwen3_config.json", tmp_path / "config.json")
    argv = ["convert", TINY, tmp_path / "hf", "--config", train, "--reference-config", reference]
    line = fails(capsys, *argv)
    assert "--set max_position_embeddings=VALUE" in line
    code, err = run(capsys, *argv, "--set", "max_position_embeddings=40960")
    assert code == 0, err
    assert "--set: max_position_embeddings=40960" in err  # the origin, in the run's log
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 40960 and config["rms_norm_eps"] == 1e-6
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    # verify takes the genuine yaml (its token ids are past this vocabulary): only what shapes
    # the bytes matters there
    argv = ["verify", tmp_path / "hf", "--against", TINY, "--config", DENSE_YAML]
    assert main([str(a) for a in argv]) == 0


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "max_position_embedings=40960",
            "--set: max_position_embedings: not a config.json setting",
        ),
        ("max_position_embeddings=forty", "max_position_embeddings = 'forty': expected a whole"),
        ("rms_norm_eps=0", "rms_norm_eps = 0: must be above zero"),
        ("use_cache=maybe", "use_cache = 'maybe': expected true or false"),
        ("hidden_size=64", "--set: hidden_size = 64 disagrees with the checkpoint"),
        ("num_experts=8", "--set describes another model (num_experts = 8)"),
        ("40960", "--set '40960': expected KEY=VALUE"),
    ],
)
def test_settings_from_the_command_line_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    assert message in fails(capsys, "convert", TINY, tmp_path / "hf", "--set", setting)


# --- MoE routing -----------------------------------------------------------------------------

DOWN = "mlp.experts.3.down_proj.weight"


def moe_yaml(tmp_path: Path, **changes: object) -> Path:
    return edited_yaml(
        fitting_tokens(MOE_YAML.name, tmp_path / "t.yaml"), tmp_path / "train.yaml", **changes
    )


def test_a_routing_scale_stops_the_run_naming_both_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, "convert", MOE, tmp_path / "hf", "--config", moe_yaml(tmp_path))
    assert "model.model_config.routed_scaling_factor = 1.5" in line
    assert "--fold-routing-scale" in line and "--ignore-routing-scale" in line
    spelled = moe_yaml(tmp_path, routed_scaling_factor=None, moe_router_topk_scaling_factor=2.0)
    line = fails(capsys, "convert", MOE, tmp_path / "hf", "--config", spelled)
    assert "moe_router_topk_scaling_factor = 2.0" in line


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp16"])
def test_fold_multiplies_every_expert_down_proj_in_fp32_before_the_cast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dtype: str
) -> None:
    out = tmp_path / "hf"
    argv = ["convert", MOE, out, "--config", moe_yaml(tmp_path), "--dtype", dtype]
    code, err = run(capsys, *argv, "--fold-routing-scale", "--memory-budget", "1MiB")
    assert code == 0, err
    assert "down_proj is multiplied by 1.5" in err
    got = load_hf_dir(out)
    truth = load_tensors(MOE / "ground_truth" / "hf_model.safetensors")
    wanted = EXPECTED_DTYPE[dtype]
    scaled = 0
    for name, want in truth.items():
        if ".mlp.experts." in name and name.endswith("down_proj.weight"):
            want = (want.astype(np.float32) * np.float32(1.5)).astype(wanted)
            scaled += 1
        else:
            want = want.astype(wanted)
        assert got[name].tobytes() == want.tobytes(), name
    assert scaled == 4 * 8
    config = json.loads((out / "config.json").read_text())
    assert config["norm_topk_prob"] is False and config["num_experts_per_tok"] == 2
    # verify recomputes the folded weights when told how the conversion was made
    argv = ["verify", out, "--against", MOE, "--config", moe_yaml(tmp_path)]
    assert main([str(a) for a in [*argv, "--fold-routing-scale"]]) == 0
    assert main([str(a) for a in [*argv, "--ignore-routing-scale"]]) == 1


def test_ignore_writes_the_weights_as_trained_and_says_what_is_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    code, err = run(
        capsys, "convert", MOE, out, "--config", moe_yaml(tmp_path), "--ignore-routing-scale"
    )
    assert code == 0, err
    assert "routed_scaling_factor = 1.5 is dropped" in err and "outputs differ" in err
    truth = load_tensors(MOE / "ground_truth" / "hf_model.safetensors")
    got = load_hf_dir(out)
    name = f"model.layers.1.{DOWN}"
    assert got[name].tobytes() == truth[name].astype(ml_dtypes.bfloat16).tobytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"moe_router_score_function": "sigmoid"}, "routes with softmax scores only"),
        ({"moe_router_enable_expert_bias": True}, "has no expert bias"),
        ({"n_group": 4}, "has no group-limited routing"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor = 0: expected a positive number"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok must be 1..8"),
    ],
)
def test_routing_hugging_face_cannot_state_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, object], message: str
) -> None:
    train = moe_yaml(tmp_path, **change)
    line = fails(capsys, "convert", MOE, tmp_path / "hf", "--config", train, "--fold-routing-scale")
    assert message in line


# --- steps and ranks -------------------------------------------------------------------------


def with_newer_step_in(root: Path, ranks: tuple[int, ...]) -> None:
    for rank in ranks:
        (old,) = (root / "checkpoint" / f"rank_{rank}").glob("*-1000_1.safetensors")
        shutil.copy(old, old.with_name(old.name.replace("-1000_1", "-2000_1")))


def test_an_incomplete_newest_step_is_named_with_the_step_converted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_fixture("tiny_fp32", tmp_path / "train")
    with_newer_step_in(root, (0, 1))
    code, err = run(capsys, "convert", root, tmp_path / "hf")
    assert code == 0, err
    assert "step 2000_1 is missing in rank_2, rank_3" in err and "using step 1000_1" in err
    assert select_step(find_rank_dirs(root / "checkpoint"))[0] == "1000_1"


def test_the_newest_step_every_rank_has_is_the_default(tmp_path: Path) -> None:
    root = copy_fixture("tiny_fp32", tmp_path / "train")
    with_newer_step_in(root, (0, 1, 2, 3))  # 2000_1 complete, beside 1000_1
    ranks = find_rank_dirs(root / "checkpoint")
    assert select_step(ranks)[0] == "2000_1"
    assert select_step(ranks, "1000")[0] == "1000_1"
    plan = plan_source(root / "checkpoint", root / "strategy")
    assert plan.step == "2000_1"
    assert plan.choice is not None and plan.choice.present == ("1000_1", "2000_1")


def test_inspect_lists_incomplete_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_fixture("tiny_fp32", tmp_path / "train")
    with_newer_step_in(root, (1,))
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "incomplete step 2000_1: missing in rank_0, rank_2, rank_3" in out
    assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["incomplete_steps"] == {"2000_1": [0, 2, 3]}


def test_a_missing_last_rank_folder_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_fixture("tiny_fp32", tmp_path / "train")
    shutil.rmtree(root / "checkpoint" / "rank_3")
    line = fails(capsys, "convert", root, tmp_path / "hf")
    assert "no folder for rank_3" in line and "describe ranks 0 to 3" in line


def test_a_hugging_face_folder_given_as_input_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = tmp_path / "hf"
    assert main(["convert", str(TINY), str(hf), "-q"]) == 0
    line = fails(capsys, "convert", hf, tmp_path / "again")
    assert f"{hf}: is a Hugging Face checkpoint" in line and "ms2hf verify" in line


@pytest.mark.parametrize("rows_per_band", [1, 3, 64])
def test_a_folded_scale_is_the_same_in_bands_of_any_height(rows_per_band: int) -> None:
    """Each band of a scaled tensor is assembled in fp32 in the buffer's second part; whatever
    the band height, the bytes are the oracle's (ground truth x 1.5 in fp32, cast to bf16)."""
    source = plan_source(MOE / "checkpoint", MOE / "strategy")
    given = {"routed_scaling_factor": ConfigValue(1.5, "test")}
    shapes = {name: p.shape for name, p in source.params.items()}
    outputs = hf_model(shapes, given, "BF16", "fold").outputs
    tensor = next(t for t in outputs if t.name == f"model.layers.2.{DOWN}")
    assert tensor.scale == 1.5
    dtype = np.dtype(ml_dtypes.bfloat16)
    row_cost = tensor.row_elements * (dtype.itemsize + 4)
    buffer = np.empty(rows_per_band * row_cost + 4, np.uint8)
    with MappedFiles() as mapped:
        bands = assembled_bands(tensor, dtype, buffer, source.params, mapped)
        got = b"".join(raw.tobytes() for _, _, raw in bands)
    truth = load_tensors(MOE / "ground_truth" / "hf_model.safetensors")[tensor.name]
    assert got == (truth.astype(np.float32) * np.float32(1.5)).astype(dtype).tobytes()
