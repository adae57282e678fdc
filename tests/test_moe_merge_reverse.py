"""``merge`` and ``reverse --model qwen3-moe`` on a generated Qwen3-MoE with expert parallelism,
optimizer sharding, a de-duplicated save and a dense layer: the unified folder holds the
MindSpore parameters, the old tool's size flags are checked against the shapes, and reverse
writes exactly what convert writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ms2hf.commands.merge import MergeOptions, merge
from ms2hf.generator import Generated, GeneratorConfig, MoeConfig, generate
from tests.conftest import folder_bytes, load_hf_dir, load_tensors
from tests.conftest import run_cli as run
from tests.test_legacy_flags import reverse_argv
from tests.test_merge import load_unified, ms_params

RUN = GeneratorConfig(
    layers=4,
    hidden=32,
    heads=4,
    groups=2,
    head_dim=8,
    ffn=24,
    vocab=64,
    dtype="bf16",
    tp=2,
    dp=2,
    pp=2,
    opt_shard=-1,
    remove_redundancy=True,
    prefix="qwen3_moe",
    moe=MoeConfig(experts=8, moe_ffn=12, top_k=2, ep=4, mlp_only_layers=(0,)),
)
"""Each rank holds 2 of the 8 experts; every weight is optimizer-sharded; layer 0 is dense."""
FLAGS = {
    "num_layers": "4",
    "num_attention_heads": "4",
    "num_query_groups": "2",
    "kv_channels": "8",
    "ffn_hidden_size": "24",
    "hidden_size": "32",
    "num_routed_experts": "8",
    "moe_ffn_hidden_size": "12",
}
"""RUN's true sizes as ``convert_weight.py`` flags."""


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    return generate(RUN, tmp_path_factory.mktemp("moe") / "training")


@pytest.fixture(scope="module")
def unified(generated: Generated, tmp_path_factory: pytest.TempPathFactory) -> Path:
    options = MergeOptions(has_redundancy=False, part_size=100_000, progress=False)
    out = tmp_path_factory.mktemp("merged")
    return merge(generated.checkpoint_dir, generated.strategy_dir, out, options).output_dir


def test_merge_holds_the_mindspore_parameters(generated: Generated, unified: Path) -> None:
    expected = load_tensors(generated.expected)
    want = ms_params(expected, json.loads(generated.hf_config.read_text()))
    got = load_unified(unified)
    statistics = {f"decoder.layers.{i}.mlp.router.fi_accu" for i in range(1, 4)}
    assert sorted(got) == sorted([*want, *statistics])
    for name, array in want.items():
        assert got[name].tobytes() == array.tobytes(), name


def test_reverse_with_the_old_flags_equals_convert(
    generated: Generated, unified: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, *reverse_argv(unified, tmp_path / "r", FLAGS, model="qwen3-moe"))
    assert code == 0, err
    code, err = run(capsys, "convert", generated.root, tmp_path / "c", "--dtype", "bf16")
    assert code == 0, err
    assert folder_bytes(tmp_path / "r") == folder_bytes(tmp_path / "c")
    got, want = load_hf_dir(tmp_path / "r"), load_tensors(generated.expected)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].tobytes() == array.tobytes(), name


@pytest.mark.parametrize(
    ("flag", "value", "actual", "tensor"),
    [
        ("num_routed_experts", "16", "8", "mlp.router.weight"),
        ("moe_ffn_hidden_size", "24", "12", "mlp.experts.weight2"),
        ("hidden_size", "64", "32", "embedding.word_embeddings.weight"),
        ("ffn_hidden_size", "48", "24", "linear_fc1"),  # the dense layer's MLP
    ],
)
def test_a_disagreeing_flag_names_itself_the_tensor_and_both_values(
    flag: str,
    value: str,
    actual: str,
    tensor: str,
    unified: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = reverse_argv(unified, tmp_path / "hf", {**FLAGS, flag: value}, model="qwen3-moe")
    code, err = run(capsys, *argv)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert f"--{flag} = {value}" in line and f"= {actual}" in line and tensor in line, line
    assert not (tmp_path / "hf").exists()
